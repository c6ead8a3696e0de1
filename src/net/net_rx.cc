// NetDevice receive: frames from the port (or the loopback) into the guest's receiveq
// (vhost-net's handle_rx), with mergeable rx buffers spreading a frame over several chains.
//
// A port frame is first read into a per-pair host staging buffer and then copied into the
// guest's chains. Reading straight into a popped chain would save that copy, but the Port
// interface cannot say whether a frame waits before we pop, and a popped chain can neither be
// given back (no rewind on DeviceQueue) nor safely kept for later (a SET_MEM_TABLE may remap
// the memory under it). The copy is one memcpy per frame, far cheaper than the recv syscall.
#include <spdlog/spdlog.h>

#include <optional>

#include "net_pair.h"
#include "vhostkit/net/net_device.h"

namespace vhostkit::net {

namespace detail {

namespace {

// A 12-byte virtio-net header: hdr10, then num_buffers (little-endian host, virtio/ring.h
// checks); a 10-byte header is its first 10 bytes.
void make_hdr(std::uint8_t (&hdr)[12], const std::uint8_t* hdr10,
              std::uint16_t num_buffers) noexcept {
  std::memcpy(hdr, hdr10, 10);
  std::memcpy(hdr + 10, &num_buffers, 2);
}

// The frame into `first` and, with MRG_RXBUF, as many more chains as it needs (at most
// kMaxMergeChains), then the header with num_buffers. A frame that does not fit gives every
// chain it took back empty.
template <virtq::DeviceRing Ring>
Delivery fill_chains(NetDevice::Pair& p, Ring& vq, RxFormat fmt, const FrameSource& f,
                     const virtq::Chain& first) noexcept {
  // The frame's bytes; in loopback its first 12 (destination, source) come swapped, from a
  // little array placed in front of the rest of the frame.
  std::uint8_t swapped[12];
  virtq::IovCursor cur;
  if (f.swap_mac && f.len >= 12) {
    std::uint8_t m[12];
    virtq::iov_read(f.pieces, f.offset, m, 12);
    std::memcpy(swapped, m + 6, 6);
    std::memcpy(swapped + 6, m, 6);
    p.io[0] = iovec{swapped, 12};
    const std::size_t k =
        virtq::iov_tail(f.pieces, f.offset + 12, std::span<iovec>(p.io).subspan(1));
    cur = virtq::IovCursor{std::span<const iovec>(p.io.data(), k + 1)};
  } else {
    cur = virtq::IovCursor{f.pieces};
    cur.advance(f.offset);
  }

  const std::uint64_t cap1 = first.writable_len - fmt.hdr_len;
  std::size_t left = f.len;
  const std::size_t n1 = cur.copy_to(first.writable, fmt.hdr_len,
                                     static_cast<std::size_t>(std::min<std::uint64_t>(left, cap1)));
  left -= n1;
  std::size_t extra = 0;                 // chains after the first
  bool ok = left == 0 || fmt.mrg_rxbuf;  // one chain per frame without MRG_RXBUF
  while (ok && left != 0) {
    if (extra == kMaxMergeChains || vq.pending() == 0) {
      ok = false;
      break;
    }
    auto c = vq.pop(p.extra_segs);
    if (!c) {
      p.rx_errors.add(1);
      if (virtq::breaks_queue(c.error())) ok = false;
      continue;
    }
    if (c->writable_len == 0) {
      vq.push_used(c->head, 0);
      p.rx_errors.add(1);
      continue;
    }
    const std::size_t k = cur.copy_to(c->writable, 0, left);
    vq.log_write(c->writable, k);  // even if the frame is dropped below: the bytes are written
    p.merge_head[extra] = c->head;
    p.merge_len[extra] = static_cast<std::uint32_t>(k);
    ++extra;
    left -= k;
  }
  if (!ok) {
    // Live migration: the payload bytes written into the first chain are marked all the same.
    vq.log_write(first.writable, fmt.hdr_len + n1);
    // The chains are consumed; they go back empty, the driver drops and recycles them.
    vq.push_used(first.head, 0);
    for (std::size_t i = 0; i < extra; ++i) vq.push_used(p.merge_head[i], 0);
    p.rx_drops.add(1);
    if (p.log_limit.allow()) {
      spdlog::warn("net: pair {}: {}-byte frame does not fit the rx buffers; dropped", p.qp, f.len);
    }
    return Delivery::dropped;
  }
  std::uint8_t hdr[12];
  make_hdr(hdr, f.hdr10, static_cast<std::uint16_t>(extra + 1));
  virtq::iov_write(first.writable, 0, hdr, fmt.hdr_len);
  // Live migration: marked after the last write into the first chain, its header: a bit set
  // before a write lets a front-end copy the page in between and never see that write.
  vq.log_write(first.writable, fmt.hdr_len + n1);
  // The frame's chains must be consecutive in the used ring: the driver takes num_buffers
  // entries from where the first one is.
  vq.push_used(first.head, static_cast<std::uint32_t>(fmt.hdr_len + n1));
  for (std::size_t i = 0; i < extra; ++i) vq.push_used(p.merge_head[i], p.merge_len[i]);
  return Delivery::delivered;
}

// Whether the header in the buffer is `hdr` already: the modern header's 12 bytes compared
// inline rather than through a call into libc's memcmp for so few. memcmp was a quarter of the
// loopback's profile under testpmd's packed ring, most of it the miss on the header's line,
// which stays; the call goes. Interleaved A/B, 5 rounds, 64 B: packed 1.06x, split 1.01x.
bool same_header(const std::uint8_t* buf, const std::uint8_t* hdr, std::size_t len) noexcept {
  if (len == 12) {
    std::uint64_t a, b;
    std::uint32_t c, d;
    std::memcpy(&a, buf, 8);
    std::memcpy(&b, hdr, 8);
    std::memcpy(&c, buf + 8, 4);
    std::memcpy(&d, hdr + 8, 4);
    return ((a ^ b) | (c ^ d)) == 0;
  }
  return std::memcmp(buf, hdr, len) == 0;
}

}  // namespace

template <virtq::DeviceRing Ring>
RxResult deliver_frame(NetDevice::Pair& p, Ring& vq, RxFormat fmt, const FrameSource& f) noexcept {
  // The first chain carries the header: it must have room for it. The others are answered with
  // used len 0 (pop does it for a chain the walker refused) and counted in rx_errors.
  std::optional<virtq::Chain> first;
  std::uint64_t bad = 0;
  bool used_pushed = false;
  while (vq.pending() != 0) {
    auto c = vq.pop(p.rx_segs);
    if (!c) {
      ++bad;
      used_pushed = true;  // pop answered it with used len 0
      if (virtq::breaks_queue(c.error())) break;
      continue;
    }
    if (c->writable_len < fmt.hdr_len) {
      vq.push_used(c->head, 0);
      used_pushed = true;
      ++bad;
      if (p.log_limit.allow()) {
        spdlog::warn("net: pair {}: rx chain {} has {} writable bytes, header needs {}", p.qp,
                     c->head, c->writable_len, fmt.hdr_len);
      }
      continue;
    }
    first = *c;
    break;
  }
  p.rx_errors.add(bad);
  if (!first) return RxResult{Delivery::no_buffer, used_pushed};

  // The common case, one piece on each side with room for all of it: straight copies, no
  // cursor. (The guest may rewrite either buffer meanwhile; it only garbles its own frame.)
  if (f.pieces.size() == 1 && f.pieces[0].iov_len >= f.offset + f.len &&
      first->writable[0].iov_len >= fmt.hdr_len + f.len && (!f.swap_mac || f.len >= 12)) {
    auto* dst = static_cast<std::uint8_t*>(first->writable[0].iov_base);
    const auto* s = static_cast<const std::uint8_t*>(f.pieces[0].iov_base) + f.offset;
    std::uint8_t hdr[12];
    make_hdr(hdr, f.hdr10, 1);
    // Written only when it differs: a driver that recycles its buffers finds the same header
    // there (no offload, one buffer), and the line it is about to read stays in its cache
    // instead of bouncing to this core and back (DPDK's vhost library does the same).
    // A driver that writes its own header into the buffers it posts (a forwarding driver that
    // sent the buffer out before: 5.1.6.2 has it zero num_buffers) makes the compare fail every
    // time; the loopback then asks for the next headers' lines for writing (NetDevice's
    // prefetch_rx_buffer), one transfer where reading first and then writing takes two.
    // When the frame begins on the header's line, though, the copy below takes that line for
    // writing anyway: the compare would only add a load that waits for the line, where a store
    // waits in the store buffer instead (vhostkit-bench loop's buffers, a Linux guest's).
    const bool frame_shares_line =
        ((reinterpret_cast<std::uintptr_t>(dst) + fmt.hdr_len) % virtq::kCacheLine) != 0;
    const bool differs = frame_shares_line || !same_header(dst, hdr, fmt.hdr_len);
    if (differs) std::memcpy(dst, hdr, fmt.hdr_len);
    p.rx_hdr_rewritten = differs;
    if (f.swap_mac) {
      std::uint8_t m[12];
      std::memcpy(m, s, 12);
      std::memcpy(dst + fmt.hdr_len, m + 6, 6);
      std::memcpy(dst + fmt.hdr_len + 6, m, 6);
      std::memcpy(dst + fmt.hdr_len + 12, s + 12, f.len - 12);
    } else {
      std::memcpy(dst + fmt.hdr_len, s, f.len);
    }
    vq.log_write(first->writable, fmt.hdr_len + f.len);
    vq.push_used(first->head, static_cast<std::uint32_t>(fmt.hdr_len + f.len));
    return RxResult{Delivery::delivered, true};
  }
  // fill_chains pushes a used entry for the first chain whatever happens.
  return RxResult{fill_chains(p, vq, fmt, f, *first), true};
}

template RxResult deliver_frame(NetDevice::Pair&, virtq::DeviceQueue&, RxFormat,
                                const FrameSource&) noexcept;
template RxResult deliver_frame(NetDevice::Pair&, virtq::PackedDeviceQueue&, RxFormat,
                                const FrameSource&) noexcept;

}  // namespace detail

std::size_t NetDevice::rx_from_port(Pair& p, vhost::Queue& q, std::size_t budget,
                                    bool* ring_empty) noexcept {
  return q.visit([&](auto& vq) { return rx_from_port_on(p, q, vq, budget, ring_empty); });
}

template <class Ring>
std::size_t NetDevice::rx_from_port_on(Pair& p, vhost::Queue& q, Ring& vq, std::size_t budget,
                                       bool* ring_empty) noexcept {
  const std::size_t port_hdr = port_->vnet_hdr() ? 12 : 0;
  const detail::RxFormat fmt{hdr_len_, mrg_rxbuf_};
  std::uint64_t frames = 0, bytes = 0, drops = 0, errors = 0;
  bool touched = false;
  *ring_empty = false;
  while (frames + drops < budget) {
    if (vq.pending() == 0) {
      // No buffers: leave frames in the port (its queue is the backpressure).
      *ring_empty = true;
      break;
    }
    const iovec stage{p.bounce.get(), detail::kBounceBytes};
    auto r = port_->recv(p.qp, std::span<const iovec>(&stage, 1));
    if (!r) {
      if (r.error() == Errc::too_many) {
        ++drops;  // larger than any frame we take; the port dropped it
        continue;
      }
      ++errors;
      if (!p.port_failed) {
        p.port_failed = true;
        spdlog::error(
            "net: pair {}: reading {} {} failed (was the interface removed?); no more "
            "frames from it until the guest restarts the ring",
            p.qp, port_->kind(), port_->ifname());
      }
      break;
    }
    if (*r == 0) break;  // the port is idle
    if (*r < port_hdr + 14) {
      ++errors;
      continue;
    }
    // With a vnet header the port's offload fields reach the guest as they are.
    const detail::FrameSource f{.hdr10 = port_hdr != 0 ? p.bounce.get() : detail::kPlainHdr10,
                                .pieces = std::span<const iovec>(&stage, 1),
                                .offset = port_hdr,
                                .len = *r - port_hdr};
    const detail::RxResult res = detail::deliver_frame(p, vq, fmt, f);
    touched |= res.used_pushed;
    if (res.delivery == detail::Delivery::delivered) {
      ++frames;
      bytes += f.len;
    } else if (res.delivery == detail::Delivery::no_buffer) {
      // Every remaining chain was malformed: the frame is lost.
      ++drops;
      *ring_empty = true;
      break;
    }
    // Delivery::dropped was counted by deliver_frame.
  }
  p.rx_frames.add(frames);
  p.rx_bytes.add(bytes);
  p.rx_drops.add(drops);
  p.rx_errors.add(errors);
  if (touched) q.publish_and_notify();  // after the counters: a reader of used sees them
  return frames + drops;
}

void NetDevice::on_port_readable(std::uint16_t qp) noexcept {
  Pair& p = pairs_[qp];
  vhost::Queue* q = p.rxq.load(std::memory_order_acquire);
  vhost::Worker* w = p.rx_worker.load(std::memory_order_acquire);
  if (q == nullptr || w == nullptr || !q->started()) return;
  if (announce_pending_.load(std::memory_order_relaxed)) inject_announce(p, *q);
  bool empty = false;
  // A bounded batch: the fd is level-triggered, so frames left behind wake us again after the
  // other fds on this worker had their turn.
  rx_from_port(p, *q, 4u * burst_, &empty);
  if (p.port_failed && p.watching) {
    w->unwatch(p.watch_id);
    p.watching = false;
    p.watch_id = 0;
    return;
  }
  if (!empty || !p.watching) return;
  // Frames wait but the guest has no buffers. Watching the fd now would spin the worker on a
  // readable fd it cannot serve: stop watching and ask for an rx kick instead (vhost-net's
  // poll stop/start). Buffers posted before the driver saw the request are caught by the
  // re-check, so the wake-up is never lost.
  // Buffers arrived meanwhile: keep going.
  if (q->visit([](auto& vq) { return vq.enable_notifications(); })) return;
  w->unwatch(p.watch_id);
  p.watching = false;
  p.watch_id = 0;
}

bool NetDevice::handle_rx_kick(Pair& p, vhost::Queue& q) noexcept {
  bool did = false;
  if (p.qp == 0 && announce_pending_.load(std::memory_order_relaxed)) {
    did = inject_announce(p, q);
  }
  if (!port_) return did;  // loopback fills rx from the tx side
  if (p.port_failed) return did;
  if (!p.watching && p.rx_mode != vhost::PollMode::busy) {
    // The guest posted buffers after we ran dry: take the port's fd back.
    vhost::Worker* w = p.rx_worker.load(std::memory_order_acquire);
    if (w != nullptr) {
      const std::uint16_t qp = p.qp;
      // watch() allocates, but only on this empty -> refilled transition, not per frame.
      auto id = w->watch(port_->rx_fd(qp), [this, qp] { on_port_readable(qp); });
      if (id) {
        p.watch_id = *id;
        p.watching = true;
      }
    }
  }
  bool empty = false;
  return rx_from_port(p, q, burst_, &empty) != 0 || did;
}

}  // namespace vhostkit::net
