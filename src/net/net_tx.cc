// NetDevice transmit: the guest's transmitq to the port (vhost-net's handle_tx), and the
// loopback that reflects each tx frame into the same pair's receiveq with the MACs swapped.
#include <spdlog/spdlog.h>

#include "net_pair.h"
#include "vhostkit/net/net_device.h"

namespace vhostkit::net {

namespace {

// Checks a tx chain's shape; logs (rate-limited) and returns false for a malformed one.
bool tx_chain_ok(NetDevice::Pair& p, const virtq::Chain& c, std::size_t hdr_len) noexcept {
  // A header and at least an Ethernet header; no more than a GSO frame; nothing writable. The
  // device writes nothing into a tx chain, so a writable descriptor there is a driver error
  // (Linux vhost-net's handle_tx refuses one too); a driver that gets the layout wrong may have
  // the frame wrong as well, so none of the chain is sent.
  if (c.readable_len >= hdr_len + 14 && c.readable_len <= hdr_len + NetDevice::kMaxFrame &&
      c.writable_len == 0) {
    return true;
  }
  if (p.log_limit.allow()) {
    spdlog::warn(
        "net: pair {}: malformed tx chain (head {}, {} readable bytes, {} writable, header {})",
        p.qp, c.head, c.readable_len, c.writable_len, hdr_len);
  }
  return false;
}

// Loopback: bytes of each popped frame asked for ahead of the copy (a 1518-byte frame and its
// header).
constexpr std::size_t kPrefetchBytes = 1536;
// Loopback: how many frames ahead of the copy their lines (tx frame, rx buffer) are asked for.
// Not the whole burst: testpmd's mbufs are 4 KiB apart, so every frame and every rx buffer of a
// burst maps to the same L1 set (12 ways here), and 32 of each asked for at once evicted one
// another before the copy reached them; at 1518 B a whole burst is also twice the L1. Four
// ahead: 1.39x at 64 B on the packed ring and 1.25x on split under testpmd, 1.10x at 1518 B
// (interleaved A/B, bench/cycles.md); 1, 2 and 3 were within the noise of 4, 8 was slower.
constexpr std::size_t kPrefetchAhead = 4;
// Loopback: rx frames delivered between two publications of the receiveq's used entries. The
// driver starts on the first frames of a burst while the rest are still being copied, instead
// of waiting for the whole burst. Half of the default burst of 32 was best under testpmd's
// virtio-user (4, 8, 12, 20 and 24 were slower; once per burst slowest, 0.7x).
constexpr std::uint64_t kRxPublishEvery = 16;

// What became of one pop from the transmitq: a frame; a malformed chain for the caller to answer
// (with used len 0, in its turn: with IN_ORDER a used entry stands for every chain popped before
// it, so none may be answered ahead of an earlier one still held); a chain the walker refused
// and answered; an error that stops the burst.
enum class TxPop : std::uint8_t { ok, bad, skip, stop };

// What one tx burst did.
struct TxTally {
  std::uint64_t chains = 0;  // pops tried, malformed chains included
  std::uint64_t frames = 0;
  std::uint64_t bytes = 0;  // frame bytes, virtio-net header excluded
  std::uint64_t drops = 0;
  std::uint64_t errors = 0;  // malformed chains
};

// Each event once: frames, bytes, drops and errors in the pair's counters (NetDevice::stats),
// the chains popped in the queue's. Before the used entries are published, so whoever sees
// them also sees them counted.
void count_tx(NetDevice::Pair& p, vhost::Queue& q, const TxTally& t) noexcept {
  p.tx_frames.add(t.frames);
  p.tx_bytes.add(t.bytes);
  p.tx_drops.add(t.drops);
  p.tx_errors.add(t.errors);
  q.stats().chains.add(t.chains);
}

// Pops the next tx chain into `out`, its pieces into `segs` (kMaxSegs of room: a longer
// chain is malformed). A malformed chain comes back as bad, for the caller to answer; one the
// walker refused was answered there (skip); an error that breaks the queue ends the burst
// (stop). The caller counts all three as errors.
template <virtq::DeviceRing Ring>
TxPop pop_tx(NetDevice::Pair& p, Ring& vq, std::span<iovec> segs, std::size_t hdr_len,
             virtq::Chain& out) noexcept {
  auto c = vq.pop(segs);
  if (!c) {
    // The walker answered the chain (used len 0) and counted it by kind; say which.
    if (c.error() != virtq::ChainError::empty && p.log_limit.allow()) {
      spdlog::warn("net: pair {}: bad tx chain: {}", p.qp, virtq::to_string(c.error()));
    }
    return virtq::breaks_queue(c.error()) ? TxPop::stop : TxPop::skip;
  }
  out = *c;
  return tx_chain_ok(p, *c, hdr_len) ? TxPop::ok : TxPop::bad;
}

// Asks for the rx buffer a frame of `len` bytes (header included) will be written into: the
// header's bytes for reading, the frame's for writing. deliver_frame writes the header only when
// it differs from what the buffer holds, and it rarely does (drivers recycle their buffers), so
// the line can stay shared with the driver's core, which reads it next. When the last header did
// differ (hdr_for_write: a driver that rewrites them), the header's line is asked for for
// writing too. Interleaved A/B under vhostkit-bench fwd, whose tx zeroes every header: 1.03x.
void prefetch_rx_buffer(std::span<std::uint8_t> buf, std::size_t hdr_len, std::size_t len,
                        bool hdr_for_write) noexcept {
  len = std::min({len, buf.size(), hdr_len + kPrefetchBytes});
  if (len <= hdr_len) return;
  if (hdr_for_write) {
    virtq::prefetch_for_write(buf.data(), len);
    return;
  }
  __builtin_prefetch(buf.data());
  virtq::prefetch_for_write(buf.data() + hdr_len, len - hdr_len);
}

// Asks for a tx frame's bytes past the header (the loopback never reads the guest's header), up
// to a full-size frame: lines beyond are left to the hardware prefetcher, which follows the
// copy's stream.
void prefetch_tx_frame(const virtq::Chain& c, std::size_t hdr_len) noexcept {
  std::size_t skip = hdr_len;
  for (const iovec& v : c.readable) {
    if (v.iov_len <= skip) {
      skip -= v.iov_len;  // a header in a descriptor of its own
      continue;
    }
    const std::size_t n = std::min(v.iov_len - skip, kPrefetchBytes);
    virtq::prefetch_for_read(static_cast<const std::uint8_t*>(v.iov_base) + skip, n);
    return;
  }
}

}  // namespace

// One branch on the layout per burst; the burst itself runs on the concrete ring type.
bool NetDevice::handle_tx(Pair& p, vhost::Queue& q) noexcept {
  if (q.packed()) {
    return port_ ? tx_burst_port(p, q, q.packed_vq()) : tx_burst_loopback(p, q, q.packed_vq());
  }
  return port_ ? tx_burst_port(p, q, q.vq()) : tx_burst_loopback(p, q, q.vq());
}

template <class Ring>
bool NetDevice::tx_burst_port(Pair& p, vhost::Queue& q, Ring& vq) noexcept {
  const bool vnet = port_->vnet_hdr();
  TxTally t;
  const std::span<iovec> io(p.io);
  for (std::uint16_t n = 0; n < burst_ && vq.pending() != 0; ++n) {
    ++t.chains;
    virtq::Chain c;
    const TxPop r = pop_tx(p, vq, std::span<iovec>(p.tx_segs).first(detail::kMaxSegs), hdr_len_, c);
    if (r != TxPop::ok) {
      ++t.errors;
      if (r == TxPop::bad) vq.push_used(c.head, 0);
      if (r == TxPop::stop) break;
      continue;
    }
    const std::size_t frame = c.readable_len - hdr_len_;
    std::span<const iovec> pieces;
    if (vnet && hdr_len_ == 12) {
      pieces = c.readable;  // the guest's layout is the port's: no copy at all
    } else if (vnet) {
      // Legacy 10-byte header: the port wants 12 (num_buffers is meaningless on tx).
      p.hdr_scratch.fill(0);
      virtq::iov_read(c.readable, 0, p.hdr_scratch.data(), 10);
      io[0] = iovec{p.hdr_scratch.data(), 12};
      const std::size_t k = virtq::iov_tail(c.readable, 10, io.subspan(1));
      pieces = io.first(k + 1);
    } else {
      const std::size_t k = virtq::iov_tail(c.readable, hdr_len_, io);
      pieces = io.first(k);
    }
    if (port_->send(p.qp, pieces)) {
      ++t.frames;
      t.bytes += frame;
    } else {
      ++t.drops;
    }
    vq.push_used(c.head, 0);
  }
  if (t.chains == 0) return false;
  port_->flush(p.qp);
  count_tx(p, q, t);
  q.publish_and_notify();
  return true;
}

template <class Ring>
bool NetDevice::tx_burst_loopback(Pair& p, vhost::Queue& q, Ring& vq) noexcept {
  vhost::Queue* rxq = p.rxq.load(std::memory_order_acquire);
  if (rxq == nullptr || !rxq->started()) {
    // The receiveq does not run yet (a driver may start sending before it has enabled it, as
    // testpmd's --tx-first does): the frames wait on the transmitq, as DPDK's vhost PMD waits
    // for every ring, instead of being dropped. queue_started re-kicks this ring when the
    // receiveq starts. pending() marks them seen, so that an event-mode worker sleeps meanwhile
    // instead of being told again and again that chains are there.
    (void)vq.pending();
    return false;
  }
  // The rx ring is written from this thread, so it must be served by this worker too.
  if (p.rx_worker.load(std::memory_order_acquire) != p.tx_worker.load(std::memory_order_acquire)) {
    if (p.log_limit.allow()) {
      spdlog::error("net: pair {}: loopback needs tx and rx on one worker; dropping", p.qp);
    }
    rxq = nullptr;
  }
  const detail::RxFormat fmt{hdr_len_, mrg_rxbuf_};
  TxTally t;
  bool rx_touched = false;
  // Two passes. First the whole burst is popped and the first frames prefetched: the driver's
  // core wrote those lines last, and asking ahead overlaps their transfers with the copy instead
  // of paying one after the other in it. The copy loop asks for the frame kPrefetchAhead on.
  const std::span<iovec> segs(p.tx_segs);
  std::size_t used_segs = 0, batched = 0;
  // The receiveq's chains are asked for as well, for writing: the driver's core holds those
  // lines, and a store that has to take one back stalls every store behind it. Frame i goes to
  // the i-th rx chain when each frame fits one (the common case; otherwise it is only a hint).
  Ring* rx = rxq != nullptr ? &rxq->ring<Ring>() : nullptr;
  // Only when there is a burst: an idle poll round reads no receiveq line.
  const std::uint16_t rx_ready = rx != nullptr && vq.pending() != 0 ? rx->pending() : 0;
  // Frame j's bytes and the rx buffer it goes to, the rx_pos-th chain still pending.
  auto prefetch = [&](std::size_t j, std::size_t rx_pos) {
    const virtq::Chain& c = p.tx_batch[j];
    if (c.desc_count == 0) return;  // malformed: not copied
    prefetch_tx_frame(c, hdr_len_);
    if (rx != nullptr) {
      prefetch_rx_buffer(rx->peek_pending(static_cast<std::uint16_t>(rx_pos)), hdr_len_,
                         c.readable_len, p.rx_hdr_rewritten);
    }
  };
  while (t.chains < burst_ && vq.pending() != 0 && segs.size() - used_segs >= detail::kMaxSegs) {
    ++t.chains;
    virtq::Chain& c = p.tx_batch[batched];
    const TxPop r = pop_tx(p, vq, segs.subspan(used_segs, detail::kMaxSegs), hdr_len_, c);
    if (r != TxPop::ok) {
      ++t.errors;
      if (r == TxPop::bad) {
        c.desc_count = 0;  // marks it: answered with used len 0 in the second pass
        ++batched;
      }
      if (r == TxPop::stop) break;
      continue;
    }
    used_segs += c.readable.size() + c.writable.size();
    if (batched < kPrefetchAhead) prefetch(batched, batched);
    ++batched;
  }
  // And the rx ring's used entries this burst writes: the driver reads them, so they are not
  // ours either.
  if (rx != nullptr)
    rx->prefetch_used(static_cast<std::uint16_t>(std::min<std::size_t>(batched, rx_ready)));
  // Then each frame goes to the receiveq and its tx chain back, in order.
  std::uint64_t rx_frames = 0, rx_bytes = 0;  // delivered and not yet published
  // Each frame delivered is a tx frame and an rx frame: the pair counts both directions, the rx
  // side before the driver can see the frames.
  auto publish_rx = [&] {
    p.rx_frames.add(rx_frames);
    p.rx_bytes.add(rx_bytes);
    rx_frames = rx_bytes = 0;
    rxq->publish_and_notify();
    rx_touched = false;
  };
  for (std::size_t i = 0; i < batched; ++i) {
    if (rx_frames == kRxPublishEvery) publish_rx();
    // Frames before i took one rx chain each (the common case): frame i's is the next pending.
    if (i + kPrefetchAhead < batched) prefetch(i + kPrefetchAhead, kPrefetchAhead);
    const virtq::Chain& c = p.tx_batch[i];
    if (c.desc_count == 0) {
      vq.push_used(c.head, 0);  // malformed, counted in the first pass
      continue;
    }
    const std::size_t frame = c.readable_len - hdr_len_;
    auto d = detail::Delivery::no_buffer;
    if (rxq != nullptr) {
      // The guest's own header stays behind: the frame goes back with no offload asked for.
      const detail::FrameSource f{
          .pieces = c.readable, .offset = hdr_len_, .len = frame, .swap_mac = true};
      // Both rings of a device run the layout the features say: the rx ring is a Ring too.
      const detail::RxResult res = detail::deliver_frame(p, *rx, fmt, f);
      rx_touched |= res.used_pushed;
      d = res.delivery;
    }
    if (d == detail::Delivery::delivered) {
      ++t.frames;
      t.bytes += frame;
      ++rx_frames;
      rx_bytes += frame;
    } else {
      ++t.drops;  // every frame not delivered is a tx drop: sent == received + tx_drops
    }
    vq.push_used(c.head, 0);
  }
  if (t.chains == 0) return false;
  count_tx(p, q, t);
  if (rx_touched) publish_rx();
  q.publish_and_notify();
  return true;
}

}  // namespace vhostkit::net
