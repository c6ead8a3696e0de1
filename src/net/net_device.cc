// NetDevice: features, config space, ring start/stop, dispatch, the control queue and announce.
// The data paths are in net_tx.cc (tx to a port, loopback) and net_rx.cc (port to guest).
#include "vhostkit/net/net_device.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstring>
#include <limits>

#include "net_pair.h"
#include "vhostkit/virtio/features.h"
#include "vhostkit/virtio/net.h"

namespace vhostkit::net {

namespace {

using virtio::bit;
namespace nf = virtio::net_feature;

// virtio 1.2, 5.1.2: queue 2p is pair p's receiveq, 2p+1 its transmitq.
constexpr bool is_transmitq(std::uint16_t idx) { return (idx & 1u) != 0; }

std::uint64_t base_features() {
  return bit(virtio::feature::version_1) | bit(virtio::feature::ring_event_idx) |
         bit(virtio::feature::ring_indirect_desc) | bit(nf::mrg_rxbuf) | bit(nf::mac) |
         bit(nf::status) | bit(nf::ctrl_vq) | bit(nf::ctrl_rx) | bit(nf::guest_announce);
}

// Checksum and segmentation offloads: only meaningful when the port carries the vnet header
// through to a kernel that can finish the work (TAP).
std::uint64_t offload_features() {
  return bit(nf::csum) | bit(nf::guest_csum) | bit(nf::host_tso4) | bit(nf::host_tso6) |
         bit(nf::host_ecn) | bit(nf::host_ufo) | bit(nf::guest_tso4) | bit(nf::guest_tso6) |
         bit(nf::guest_ecn) | bit(nf::guest_ufo);
}

}  // namespace

NetDevice::NetDevice(NetOptions opts) : opts_(std::move(opts)) {
  port_ = std::move(opts_.port);
  pairs_count_ = std::clamp<std::uint16_t>(opts_.queue_pairs, 1, kMaxQueuePairs);
  if (port_ && port_->queue_pairs() > 0) {
    pairs_count_ = std::min(pairs_count_, port_->queue_pairs());
  }
  burst_ = std::clamp<std::uint16_t>(opts_.burst, 1, kMaxBurst);
  offered_ = base_features();
  if (opts_.packed) offered_ |= bit(virtio::feature::ring_packed);
  if (opts_.in_order) offered_ |= bit(virtio::feature::in_order);
  if (opts_.mtu != 0) offered_ |= bit(nf::mtu);
  if (pairs_count_ > 1) offered_ |= bit(nf::mq);
  if (port_ && port_->vnet_hdr()) offered_ |= offload_features();
  pairs_ = std::make_unique<Pair[]>(pairs_count_);
  for (std::uint16_t i = 0; i < pairs_count_; ++i) {
    pairs_[i].qp = i;
    if (port_) pairs_[i].bounce = std::make_unique<std::uint8_t[]>(detail::kBounceBytes);
  }
  ctrl_segs_ = std::make_unique<iovec[]>(detail::kMaxSegs);
  ctrl_mac_ = opts_.mac;
  active_pairs_.store(1, std::memory_order_relaxed);
  status_.store(virtio::kNetSLinkUp, std::memory_order_relaxed);
}

NetDevice::~NetDevice() = default;

Result<std::unique_ptr<NetDevice>> NetDevice::create(NetOptions opts) {
  if (opts.queue_pairs < 1 || opts.queue_pairs > kMaxQueuePairs) {
    return fail(Errc::out_of_range, "queue pairs must be 1.." + std::to_string(kMaxQueuePairs));
  }
  if (opts.port && opts.port->queue_pairs() < opts.queue_pairs) {
    return fail(Errc::out_of_range, "the port serves fewer queue pairs than requested");
  }
  if (opts.burst < 1 || opts.burst > kMaxBurst) {
    return fail(Errc::out_of_range, "burst must be 1.." + std::to_string(kMaxBurst));
  }
  if (opts.mtu != 0 && opts.mtu < virtio::kNetMinMtu) {
    return fail(Errc::out_of_range, "mtu must be 0 or >= " + std::to_string(virtio::kNetMinMtu));
  }
  return std::make_unique<NetDevice>(std::move(opts));
}

std::uint64_t NetDevice::features() const noexcept { return offered_; }

std::uint16_t NetDevice::num_queues() const noexcept {
  return static_cast<std::uint16_t>(2 * pairs_count_ + 1);
}

Result<> NetDevice::read_config(std::uint32_t offset, std::span<std::uint8_t> out) const {
  virtio::VirtioNetConfig cfg{};
  std::memcpy(cfg.mac, opts_.mac.data(), 6);
  cfg.status = status_.load(std::memory_order_relaxed);
  cfg.max_virtqueue_pairs = pairs_count_;
  cfg.mtu = opts_.mtu;
  cfg.speed = std::numeric_limits<std::uint32_t>::max();  // unknown
  cfg.duplex = 0xff;                                      // unknown
  if (offset > sizeof cfg || out.size() > sizeof cfg - offset) {
    return fail(Errc::out_of_range, "config read past virtio_net_config");
  }
  std::memcpy(out.data(), reinterpret_cast<const std::uint8_t*>(&cfg) + offset, out.size());
  return {};
}

Result<> NetDevice::write_config(std::uint32_t offset, std::span<const std::uint8_t> data) {
  (void)offset;
  (void)data;
  return fail(Errc::unsupported, "virtio-net config space is read-only here (no mac writes)");
}

void NetDevice::set_features(std::uint64_t acked) noexcept {
  acked_ = acked;
  mrg_rxbuf_ = virtio::has(acked, nf::mrg_rxbuf);
  hdr_len_ = virtio::net_hdr_size(virtio::has(acked, virtio::feature::version_1), mrg_rxbuf_);
  ctrl_vq_ = virtio::has(acked, nf::ctrl_vq);
  if (port_) {
    if (auto r = port_->set_guest_offloads(acked); !r) {
      spdlog::warn("net: {} {}: guest offloads not set: {}", port_->kind(), port_->ifname(),
                   r.error().message());
    }
  }
}

void NetDevice::queue_started(vhost::Queue& q, vhost::Worker& w) {
  const std::uint16_t idx = q.index();
  if (idx >= 2 * pairs_count_) return;  // the control queue needs no setup
  Pair& p = pairs_[idx / 2];
  if (is_transmitq(idx)) {
    p.tx_worker.store(&w, std::memory_order_release);
    p.txq.store(&q, std::memory_order_release);
    // An announce that came before this ring ran (see announce()).
    if (p.qp == 0 && port_ && announce_pending_.load(std::memory_order_acquire)) {
      w.queue_work([this] { send_announce(); });
    }
    return;
  }
  p.rx_mode = w.options().mode;
  p.port_failed = false;  // a restarted ring tries the port again
  p.rx_worker.store(&w, std::memory_order_release);
  p.rxq.store(&q, std::memory_order_release);
  // Loopback: frames sent before this ring ran wait on the transmitq (tx_burst_loopback); serve
  // them now. Only a transmitq on this worker: the loopback needs both rings on one, and its
  // kick fd is stable only while this worker sees it running.
  if (!port_ && p.tx_worker.load(std::memory_order_acquire) == &w) {
    if (vhost::Queue* tx = p.txq.load(std::memory_order_acquire)) tx->rekick();
  }
  // Busy mode polls the port from handle_queue; the other modes sleep in epoll and need the
  // port's fd in the set.
  if (port_ && p.rx_mode != vhost::PollMode::busy) {
    const std::uint16_t qp = p.qp;
    auto id = w.watch(port_->rx_fd(qp), [this, qp] { on_port_readable(qp); });
    if (id) {
      p.watch_id = *id;
      p.watching = true;
    } else {
      spdlog::error("net: pair {}: cannot watch the port's rx fd: {}", qp, id.error().message());
    }
  }
}

void NetDevice::queue_stopped(vhost::Queue& q, vhost::Worker& w) {
  const std::uint16_t idx = q.index();
  if (idx >= 2 * pairs_count_) return;
  Pair& p = pairs_[idx / 2];
  if (is_transmitq(idx)) {
    p.txq.store(nullptr, std::memory_order_release);
    p.tx_worker.store(nullptr, std::memory_order_release);
    return;
  }
  if (p.watching) {
    w.unwatch(p.watch_id);
    p.watching = false;
    p.watch_id = 0;
  }
  p.rxq.store(nullptr, std::memory_order_release);
  p.rx_worker.store(nullptr, std::memory_order_release);
}

bool NetDevice::handle_queue(vhost::Queue& q) noexcept {
  const std::uint16_t idx = q.index();
  if (idx == 2 * pairs_count_) return handle_ctrl(q);
  if (idx > 2 * pairs_count_) return false;
  Pair& p = pairs_[idx / 2];
  return is_transmitq(idx) ? handle_tx(p, q) : handle_rx_kick(p, q);
}

NetStats NetDevice::stats(std::uint16_t qp) const noexcept {
  NetStats s;
  if (qp >= pairs_count_) return s;
  const Pair& p = pairs_[qp];
  s.tx_frames = p.tx_frames.load();
  s.tx_bytes = p.tx_bytes.load();
  s.tx_drops = p.tx_drops.load();
  s.tx_errors = p.tx_errors.load();
  s.rx_frames = p.rx_frames.load();
  s.rx_bytes = p.rx_bytes.load();
  s.rx_drops = p.rx_drops.load();
  s.rx_errors = p.rx_errors.load();
  return s;
}

std::array<std::uint8_t, 6> NetDevice::mac() const {
  std::lock_guard lk(mac_mu_);
  return ctrl_mac_;
}

// ---- control queue (virtio 1.2, 5.1.6.5) ------------------------------------------------------

bool NetDevice::handle_ctrl(vhost::Queue& q) noexcept {
  if (!ctrl_vq_) return false;
  return q.packed() ? ctrl_burst(q, q.packed_vq()) : ctrl_burst(q, q.vq());
}

template <class Ring>
bool NetDevice::ctrl_burst(vhost::Queue& q, Ring& vq) noexcept {
  const std::span<iovec> segs(ctrl_segs_.get(), detail::kMaxSegs);
  bool any = false;
  for (std::uint16_t n = 0; n < burst_ && vq.pending() != 0; ++n) {
    any = true;
    auto c = vq.pop(segs);
    if (!c) {
      ctrl_errors_.fetch_add(1, std::memory_order_relaxed);
      if (virtq::breaks_queue(c.error())) break;
      continue;
    }
    if (c->readable_len < sizeof(virtio::VirtioNetCtrlHdr) || c->writable_len < 1) {
      // No command to read or nowhere to put the ack.
      vq.push_used(c->head, 0);
      ctrl_errors_.fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    std::uint8_t hdr[2];
    virtq::iov_read(c->readable, 0, hdr, 2);
    std::uint8_t ack = exec_ctrl(hdr[0], hdr[1], c->readable, c->readable_len - 2);
    virtq::iov_write(c->writable, 0, &ack, 1);
    vq.log_write(c->writable, 1);
    vq.push_used(c->head, 1);
  }
  if (any) q.publish_and_notify();
  return any;
}

std::uint8_t NetDevice::exec_ctrl(std::uint8_t cls, std::uint8_t cmd,
                                  std::span<const iovec> readable,
                                  std::uint64_t data_len) noexcept {
  namespace c = virtio::net_ctrl;
  auto read = [&](std::uint64_t off, void* dst, std::size_t n) {
    return off <= data_len && n <= data_len - off &&
           virtq::iov_read(readable, 2 + off, dst, n) == n;
  };
  switch (cls) {
    case c::rx: {
      std::uint8_t on = 0;
      if (cmd > c::rx_nobcast || !read(0, &on, 1)) break;
      const std::uint8_t mask = static_cast<std::uint8_t>(1u << cmd);
      if (on) {
        rx_mode_.fetch_or(mask, std::memory_order_relaxed);
      } else {
        rx_mode_.fetch_and(static_cast<std::uint8_t>(~mask), std::memory_order_relaxed);
      }
      return virtio::kNetCtrlOk;
    }
    case c::mac: {
      if (cmd == c::mac_addr_set) {
        std::array<std::uint8_t, 6> m;
        if (!read(0, m.data(), 6)) break;
        std::lock_guard lk(mac_mu_);
        ctrl_mac_ = m;
        return virtio::kNetCtrlOk;
      }
      if (cmd == c::mac_table_set) {
        // Two tables (unicast, multicast), each le32 entries + entries * 6 bytes.
        std::uint64_t off = 0;
        std::uint32_t total = 0;
        bool ok = true;
        for (int t = 0; t < 2 && ok; ++t) {
          std::uint32_t entries = 0;
          ok = read(off, &entries, 4);
          off += 4;
          if (ok && std::uint64_t{entries} * 6 > data_len - off) ok = false;
          off += std::uint64_t{entries} * 6;
          total += entries;
        }
        if (!ok) break;
        std::lock_guard lk(mac_mu_);
        ctrl_mac_table_entries_ = total;
        return virtio::kNetCtrlOk;
      }
      break;
    }
    case c::mq: {
      std::uint16_t pairs = 0;
      if (cmd != c::mq_vq_pairs_set || !read(0, &pairs, 2)) break;
      if (pairs < 1 || pairs > pairs_count_) break;
      active_pairs_.store(pairs, std::memory_order_relaxed);
      return virtio::kNetCtrlOk;
    }
    case c::announce:
      if (cmd != c::announce_ack) break;
      status_.fetch_and(static_cast<std::uint16_t>(~virtio::kNetSAnnounce),
                        std::memory_order_relaxed);
      return virtio::kNetCtrlOk;
    default: break;
  }
  return virtio::kNetCtrlErr;
}

// ---- announce (SEND_RARP) ----------------------------------------------------------------------

void NetDevice::announce(const std::uint8_t mac[6]) {
  {
    std::lock_guard lk(announce_mu_);
    std::memcpy(announce_mac_.data(), mac, 6);
  }
  announce_pending_.store(true, std::memory_order_release);
  if (port_) {
    // Switches learn where the guest lives now from a frame it sends: the RARP leaves through
    // the port as if the guest had sent it (QEMU's own announce and DPDK's vhost library do the
    // same). From pair 0's tx worker, the only thread that sends on pair 0; if that ring is not
    // running yet, as soon as it starts.
    if (vhost::Worker* w = pairs_[0].tx_worker.load(std::memory_order_acquire)) {
      w->queue_work([this] { send_announce(); });
    }
    return;
  }
  // The loopback: the guest is all the network there is. Deliver from pair 0's rx worker, the
  // only thread that may write that ring. If the ring is not running yet, the next rx kick (the
  // guest posting buffers) delivers it.
  if (vhost::Worker* w = pairs_[0].rx_worker.load(std::memory_order_acquire)) {
    w->queue_work([this] {
      Pair& p = pairs_[0];
      if (vhost::Queue* q = p.rxq.load(std::memory_order_acquire); q && q->started()) {
        inject_announce(p, *q);
      }
    });
  }
}

void NetDevice::rarp_frame(std::uint8_t (&frame)[kRarpLen]) {
  // A gratuitous RARP (ethertype 0x8035) from the new location, as QEMU's announce sends.
  std::memset(frame, 0, kRarpLen);
  {
    std::lock_guard lk(announce_mu_);
    std::memset(frame, 0xff, 6);
    std::memcpy(frame + 6, announce_mac_.data(), 6);
    std::memcpy(frame + 22, announce_mac_.data(), 6);  // sender hardware address
    std::memcpy(frame + 32, announce_mac_.data(), 6);  // target hardware address
  }
  const std::uint8_t fixed[] = {0x80, 0x35,   // ethertype RARP
                                0x00, 0x01,   // hardware: Ethernet
                                0x08, 0x00,   // protocol: IPv4
                                6,    4,      // address lengths
                                0x00, 0x03};  // op: reverse request
  std::memcpy(frame + 12, fixed, sizeof fixed);
}

void NetDevice::send_announce() noexcept {
  if (!announce_pending_.exchange(false, std::memory_order_acq_rel)) return;
  // A vnet port takes a virtio_net_hdr in front of every frame: all zero, nothing to offload.
  std::uint8_t buf[12 + kRarpLen] = {};
  const std::size_t h = port_->vnet_hdr() ? 12 : 0;
  std::uint8_t frame[kRarpLen];
  rarp_frame(frame);
  std::memcpy(buf + h, frame, kRarpLen);
  const iovec v{buf, h + kRarpLen};
  const bool sent = port_->send(0, std::span<const iovec>(&v, 1));
  port_->flush(0);
  if (sent) {
    spdlog::info("net: announced {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} on {} {} (RARP)",
                 frame[6], frame[7], frame[8], frame[9], frame[10], frame[11], port_->kind(),
                 port_->ifname());
  } else {
    spdlog::warn("net: the announce RARP could not be sent on {} {}", port_->kind(),
                 port_->ifname());
  }
}

bool NetDevice::inject_announce(Pair& p, vhost::Queue& q) noexcept {
  if (port_ || p.qp != 0 || !announce_pending_.load(std::memory_order_acquire)) return false;
  std::uint8_t frame[kRarpLen];
  rarp_frame(frame);
  const iovec src{frame, sizeof frame};
  const detail::FrameSource f{.pieces = std::span<const iovec>(&src, 1), .len = sizeof frame};
  const detail::RxFormat fmt{hdr_len_, mrg_rxbuf_};
  const detail::RxResult res =
      q.visit([&](auto& vq) { return detail::deliver_frame(p, vq, fmt, f); });
  if (res.delivery == detail::Delivery::delivered) {
    announce_pending_.store(false, std::memory_order_relaxed);
    p.rx_frames.add(1);
    p.rx_bytes.add(sizeof frame);
  } else if (res.delivery == detail::Delivery::dropped) {
    announce_pending_.store(false, std::memory_order_relaxed);  // it can never fit
  }
  if (res.used_pushed) q.publish_and_notify();
  return res.used_pushed;
}

}  // namespace vhostkit::net
