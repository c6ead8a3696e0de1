// A userspace virtio-net driver over a vhost-user front-end (FrontendSession, the protocol
// side): queue pairs, a packet buffer pool per ring, tx and rx bursts. vhostkit-bench,
// vhostkit-probe and the tests move frames with it.
//
// Buffers: each ring's area holds `queue_size` fixed-size buffers, owned by that ring for the
// whole session. The rx ring is filled with all of its buffers before the back-end sees it and
// refilled as frames are consumed; tx takes buffers from a free stack and returns them when the
// device hands the chain back. forward() lends a received buffer to the transmitq, frame and
// all, and it goes back to the rx ring when the device hands that tx chain back. Nothing on the
// data path allocates or throws.
//
// Queue numbering (virtio 1.2, 5.1.2): ring 2p is pair p's receiveq, ring 2p+1 its transmitq.
//
// The device is hostile too: a used length shorter than the virtio-net header, or a num_buffers
// of 0 or more than the ring holds, costs that frame (RingStats::bad), nothing else.
//
// Ring layout: split or packed (NetDriverOptions::ring), with or without IN_ORDER, whatever the
// back-end agreed to (session().layout(), in_order()). Each burst looks at the layout once and
// runs a copy of the data path made for it (a template over the queue type).
//
// Threading: one thread drives the control path; each pair's data path may run on its own
// thread, one thread per pair.
#pragma once

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "vhostkit/driver/ring_buffers.h"
#include "vhostkit/error.h"
#include "vhostkit/vhost_user/channel.h"
#include "vhostkit/vhost_user/frontend_session.h"
#include "vhostkit/virtio/features.h"
#include "vhostkit/virtio/net.h"

namespace vhostkit::driver {

// Feature bits we ask a net back-end for by default (MQ is added when queue_pairs > 1).
inline constexpr std::uint64_t kNetFeatures =
    virtio::bit(virtio::feature::version_1) | virtio::bit(virtio::feature::ring_event_idx) |
    virtio::bit(virtio::net_feature::mrg_rxbuf) | virtio::bit(virtio::net_feature::mac) |
    virtio::bit(virtio::net_feature::status);

// Feature bits this driver knows how to drive: anything else is never acked, even if asked for.
// (No offloads: we never build GSO frames or checksum-offload headers.)
inline constexpr std::uint64_t kNetDrivableFeatures =
    kNetFeatures | virtio::bit(virtio::net_feature::mq) | virtio::bit(virtio::net_feature::mtu) |
    virtio::bit(virtio::feature::any_layout) | virtio::bit(virtio::feature::protocol_features) |
    virtio::bit(virtio::feature::ring_packed) | virtio::bit(virtio::feature::in_order);

struct NetDriverOptions {
  // Where to connect, unless `channel` is already connected.
  std::string socket_path;
  vhost_user::Channel channel;

  std::uint16_t queue_pairs = 1;        // 1..NetDriver::kMaxQueuePairs; rings = 2 * queue_pairs
  std::uint16_t queue_size = 256;       // power of two, 2..32768
  std::size_t memory_size = 64u << 20;  // the shared region; 0: just what rings + buffers need
  std::uint32_t buffer_size = 2048;     // per packet buffer, >= 64 (header + a minimal frame)
  // rx buffers are given to the ring 64 - header bytes into their slot, so that each received
  // frame starts a cache line, as in DPDK's mbufs (128 bytes of headroom less the header). A
  // frame forward() sends back out then shares no line with the header it rewrites. Needs
  // buffer_size >= 64 + 60.
  bool align_rx_frames = false;
  // Feature bits wanted (acked = wanted & offered & drivable). Unset: kNetFeatures plus MQ
  // when queue_pairs > 1.
  std::optional<std::uint64_t> features;
  // Asks for the packed ring (VIRTIO_F_RING_PACKED) and for VIRTIO_F_IN_ORDER on top of
  // `features`; either is acked only if the back-end offers it (else split, or any order).
  vhost_user::RingLayout ring = vhost_user::RingLayout::split;
  bool in_order = false;
  std::uint64_t protocol_features = vhost_user::kFrontendProtocolFeatures;
  vhost_user::FrontendOptions::Notify notify = vhost_user::FrontendOptions::Notify::event;
  // Bound on each control-path step (send, or wait for a reply).
  std::chrono::milliseconds timeout{2000};
  std::string name = "frontend";  // in log lines

  // The FrontendOptions these become (checks the net-specific fields first).
  Result<vhost_user::FrontendOptions> session_options() &&;
};

// Per-ring counters; written by the ring's data-path thread only. (Kicks and calls are the
// protocol side's: FrontendRing::kicks, calls.)
struct RingStats {
  std::uint64_t frames = 0;     // tx: frames placed on the ring; rx: frames delivered
  std::uint64_t bytes = 0;      // frame bytes (virtio-net header excluded)
  std::uint64_t completed = 0;  // tx: chains the device returned
  std::uint64_t full = 0;       // tx: frames refused for lack of a free buffer
  std::uint64_t oversize = 0;   // tx: frames larger than a buffer (dropped)
  std::uint64_t bad = 0;        // rx: used entries we could not make a frame of
};

// One ring's buffers. For tx the free stack holds the buffers not on the ring; for rx the ones
// waiting to be given back to it.
struct NetRing : RingBuffers {
  bool is_rx = false;
  // rx with MRG_RXBUF: a frame spread over several buffers is gathered here.
  std::vector<std::uint8_t> merge;
  std::size_t merge_len = 0;
  std::uint16_t merge_left = 0;  // buffers still to come for the frame being gathered
  bool merge_bad = false;        // the frame being gathered did not fit: drop it at its end
  RingStats stats;
};

class NetDriver {
 public:
  static constexpr std::uint16_t kMaxQueuePairs = 128;
  static constexpr std::size_t kBurst = 64;  // used entries reclaimed per step

  // Connects, negotiates, fills the receive rings and starts every ring. On failure everything
  // acquired so far is released and the error names the step that failed.
  static Result<std::unique_ptr<NetDriver>> connect(NetDriverOptions opts);

  ~NetDriver() = default;  // the session closes itself
  NetDriver(const NetDriver&) = delete;
  NetDriver& operator=(const NetDriver&) = delete;

  // The protocol side: what was negotiated, the memory, the socket, kick and call.
  vhost_user::FrontendSession& session() noexcept { return *session_; }
  const vhost_user::FrontendSession& session() const noexcept { return *session_; }
  std::uint64_t features() const noexcept { return session_->features(); }  // acked
  std::uint16_t queue_pairs() const noexcept { return queue_pairs_; }
  std::uint16_t queue_size() const noexcept { return session_->queue_size(); }
  vhost_user::RingLayout layout() const noexcept { return session_->layout(); }
  bool in_order() const noexcept { return session_->in_order(); }
  std::size_t net_hdr_len() const noexcept { return hdr_len_; }
  // Largest frame tx_burst accepts (a buffer minus the virtio-net header).
  std::size_t max_frame() const noexcept { return buffer_size_ - hdr_len_; }

  // ---- Control path ----
  // The MAC from config space (needs CONFIG and VIRTIO_NET_F_MAC).
  Result<std::array<std::uint8_t, 6>> mac();
  // GET_VRING_BASE on every ring: FrontendSession::stop().
  Result<std::vector<std::uint32_t>> stop() { return session_->stop(); }
  // FrontendSession::close().
  void close() noexcept { session_->close(); }

  // ---- Data path (noexcept, allocation-free) ----
  static constexpr std::uint16_t rx_index(std::uint16_t qp) noexcept {
    return static_cast<std::uint16_t>(2u * qp);
  }
  static constexpr std::uint16_t tx_index(std::uint16_t qp) noexcept {
    return static_cast<std::uint16_t>(2u * qp + 1);
  }
  NetRing& tx_ring(std::uint16_t qp) noexcept { return rings_[tx_index(qp)]; }
  NetRing& rx_ring(std::uint16_t qp) noexcept { return rings_[rx_index(qp)]; }
  NetRing& ring(std::uint16_t i) noexcept { return rings_[i]; }
  const RingStats& stats(std::uint16_t ring) const noexcept { return rings_[ring].stats; }

  // Reclaims finished tx chains, then puts up to frames.size() frames on pair qp's transmitq
  // (each with a zeroed virtio-net header in front), publishes and kicks if the device wants
  // it. Returns how many frames were consumed from the front of `frames` (oversize ones are
  // dropped and counted, and count as consumed); stops early when no buffer is free.
  std::size_t tx_burst(std::uint16_t qp,
                       std::span<const std::span<const std::uint8_t>> frames) noexcept;

  // The same with the caller writing each frame in place: fill(i, room) writes frame i into
  // `room` (max_frame() bytes) and returns its length (0 ends the burst early).
  template <typename Fill>
  std::size_t tx_burst_fill(std::uint16_t qp, std::size_t n, Fill&& fill) noexcept;

  // Calls on_frame(std::span<const std::uint8_t>) for up to `max` received frames (header
  // stripped; the span is valid during the call only), gives the buffers back to the ring,
  // publishes and kicks if needed. Returns frames delivered.
  template <typename OnFrame>
  std::size_t rx_burst(std::uint16_t qp, std::size_t max, OnFrame&& on_frame) noexcept;

  // Sends up to `max` frames received on pair qp back out of its transmitq from the buffers
  // they arrived in, untouched but for a zeroed virtio-net header (testpmd's io forwarding,
  // without the copy): such a buffer is off the receiveq until the device hands its tx chain
  // back. A frame gathered from several buffers (MRG_RXBUF) is larger than a buffer: dropped,
  // counted in the tx ring's `oversize`; one that finds the transmitq full, in its `full`.
  // Reclaims the transmitq first, refills the receiveq last; publishes and kicks. Returns frames
  // sent.
  std::size_t forward(std::uint16_t qp, std::size_t max) noexcept;

  // Returns finished tx chains' buffers to the free stack (a forwarded one to its receiveq's);
  // how many.
  std::size_t reclaim_tx(std::uint16_t qp) noexcept;
  // FrontendSession::wait_call on ring i.
  bool wait_call(std::uint16_t ring, std::chrono::milliseconds timeout) noexcept {
    return session_->wait_call(ring, timeout);
  }

 private:
  NetDriver() = default;
  Result<> setup(std::uint32_t buffer_size, bool align_rx_frames);

  // A tx chain's token: the buffer's index, with this bit when the buffer is an rx buffer that
  // forward() lent to the transmitq.
  static constexpr std::uint64_t kLentToken = std::uint64_t{1} << 32;

  // The data path on one layout's queue (virtq::DriverQueue or virtq::PackedDriverQueue).
  template <typename Q>
  std::size_t reclaim_tx_on(NetRing& r, Q& vq) noexcept;
  template <typename Q>
  std::size_t forward_on(std::uint16_t qp, Q& txq, Q& rxq, std::size_t max) noexcept;
  // Puts the `len` bytes at `gpa` (header and frame) on the transmitq as one chain named
  // `token`, and counts the frame (or, the ring being full, the refusal). Publishes nothing.
  template <typename Q>
  bool add_tx(NetRing& r, Q& vq, std::uint64_t gpa, std::size_t len, std::uint64_t token) noexcept;
  template <typename Q, typename Fill>
  std::size_t tx_burst_on(NetRing& r, Q& vq, std::size_t n, Fill& fill) noexcept;
  template <typename Q, typename OnFrame>
  std::size_t rx_burst_on(NetRing& r, Q& vq, std::size_t max, OnFrame& on_frame) noexcept;
  template <typename Q>
  void refill_rx(NetRing& r, Q& vq) noexcept;
  template <typename Q>
  void kick_if_needed(NetRing& r, Q& vq) noexcept {
    if (r.ring->kick.valid() && !session_->stopped() && vq.needs_kick()) {
      session_->kick(r.ring->index);
    }
  }
  bool deliver_buffer(NetRing& r, const virtq::DriverQueue::Used& u,
                      std::span<const std::uint8_t>& frame) noexcept;

  std::unique_ptr<vhost_user::FrontendSession> session_;
  std::uint16_t queue_pairs_ = 0;
  std::uint32_t buffer_size_ = 0;
  std::size_t hdr_len_ = sizeof(virtio::VirtioNetHdrMrg);
  bool mrg_rxbuf_ = false;
  std::vector<NetRing> rings_;
};

// ---- Inline data path ----

template <typename Q>
std::size_t NetDriver::reclaim_tx_on(NetRing& r, Q& vq) noexcept {
  std::size_t total = 0;
  // The pair's receiveq (ring index - 1): where a lent buffer goes back.
  NetRing& rx = rings_[r.ring->index - 1u];
  for (;;) {
    const std::size_t n = vq.get_used_burst(r.used);
    for (std::size_t k = 0; k < n; ++k) {
      const std::uint64_t token = r.used[k].token;
      NetRing& owner = (token & kLentToken) != 0 ? rx : r;
      owner.free[owner.free_top++] = static_cast<std::uint16_t>(token);
    }
    total += n;
    if (n < r.used.size()) break;
  }
  r.stats.completed += total;
  return total;
}

inline std::size_t NetDriver::reclaim_tx(std::uint16_t qp) noexcept {
  NetRing& r = tx_ring(qp);
  return r.ring->visit([&](auto& vq) { return reclaim_tx_on(r, vq); });
}

template <typename Q, typename Fill>
std::size_t NetDriver::tx_burst_on(NetRing& r, Q& vq, std::size_t n, Fill& fill) noexcept {
  if (r.free_top < n) reclaim_tx_on(r, vq);
  const std::size_t room = r.buffer_size - hdr_len_;
  std::size_t done = 0;
  std::size_t added = 0;
  for (; done < n; ++done) {
    if (r.free_top == 0) {
      r.stats.full += n - done;
      break;
    }
    const std::uint16_t b = r.free[r.free_top - 1];
    std::uint8_t* p = r.buffer(b);
    const std::size_t len = fill(done, std::span<std::uint8_t>(p + hdr_len_, room));
    if (len == 0) break;
    if (len > room) {
      ++r.stats.oversize;
      continue;
    }
    // A zeroed header: no checksum offload, no GSO; num_buffers is 0 on transmit.
    std::memset(p, 0, hdr_len_);
    if (!add_tx(r, vq, r.buffer_gpa(b), hdr_len_ + len, b)) break;
    --r.free_top;
    ++added;
  }
  if (added != 0) {
    vq.publish();
    kick_if_needed(r, vq);
  }
  return done;
}

template <typename Q>
bool NetDriver::add_tx(NetRing& r, Q& vq, std::uint64_t gpa, std::size_t len,
                       std::uint64_t token) noexcept {
  const virtq::DriverQueue::Buffer out{gpa, static_cast<std::uint32_t>(len)};
  if (!vq.add(std::span(&out, 1), {}, token)) {
    ++r.stats.full;
    return false;
  }
  ++r.stats.frames;
  r.stats.bytes += len - hdr_len_;
  return true;
}

template <typename Fill>
std::size_t NetDriver::tx_burst_fill(std::uint16_t qp, std::size_t n, Fill&& fill) noexcept {
  NetRing& r = tx_ring(qp);
  if (session_->stopped()) return 0;
  return r.ring->visit([&](auto& vq) { return tx_burst_on(r, vq, n, fill); });
}

inline std::size_t NetDriver::tx_burst(
    std::uint16_t qp, std::span<const std::span<const std::uint8_t>> frames) noexcept {
  const std::size_t room = max_frame();
  return tx_burst_fill(qp, frames.size(), [&](std::size_t i, std::span<std::uint8_t> out) {
    const auto& f = frames[i];
    if (f.size() > room) return room + 1;  // counted as oversize, skipped
    std::memcpy(out.data(), f.data(), f.size());
    return f.size();
  });
}

template <typename Q>
void NetDriver::refill_rx(NetRing& r, Q& vq) noexcept {
  std::size_t added = 0;
  while (r.free_top > 0) {
    const std::uint16_t b = r.free[r.free_top - 1];
    const virtq::DriverQueue::Buffer in{r.data_gpa(b), r.data_size()};
    if (!vq.add({}, std::span(&in, 1), b)) break;
    --r.free_top;
    ++added;
  }
  if (added != 0) {
    vq.publish();
    kick_if_needed(r, vq);
  }
}

template <typename Q, typename OnFrame>
std::size_t NetDriver::rx_burst_on(NetRing& r, Q& vq, std::size_t max, OnFrame& on_frame) noexcept {
  std::size_t delivered = 0;
  while (delivered < max) {
    const std::size_t want = std::min(r.used.size(), max - delivered);
    const std::size_t n = vq.get_used_burst(std::span(r.used.data(), want));
    // The device wrote each buffer's header last: ask for all of the burst's header lines
    // before reading the first, so that their transfers overlap instead of queueing.
    for (std::size_t k = 0; k < n; ++k) {
      __builtin_prefetch(r.data(static_cast<std::uint16_t>(r.used[k].token)));
    }
    for (std::size_t k = 0; k < n; ++k) {
      std::span<const std::uint8_t> frame;
      if (deliver_buffer(r, r.used[k], frame)) {
        on_frame(frame);
        ++r.stats.frames;
        r.stats.bytes += frame.size();
        ++delivered;
      }
      // The frame has been consumed (or gathered into `merge`): the buffer may go back.
      r.free[r.free_top++] = static_cast<std::uint16_t>(r.used[k].token);
    }
    if (n < want || n == 0) break;
  }
  refill_rx(r, vq);
  return delivered;
}

template <typename Q>
std::size_t NetDriver::forward_on(std::uint16_t qp, Q& txq, Q& rxq, std::size_t max) noexcept {
  NetRing& tx = tx_ring(qp);
  NetRing& rx = rx_ring(qp);
  reclaim_tx_on(tx, txq);  // lent buffers back on rx's free stack, refilled below
  std::size_t seen = 0, sent = 0;
  while (seen < max) {
    const std::size_t want = std::min(rx.used.size(), max - seen);
    const std::size_t n = rxq.get_used_burst(std::span(rx.used.data(), want));
    // Each header below is read (num_buffers) and then zeroed, in a line the device has just
    // written: asked for for writing up front, the lines of the burst come in together and
    // once each, instead of one read miss and then one upgrade per frame, each in its turn.
    for (std::size_t k = 0; k < n; ++k)
      __builtin_prefetch(rx.data(static_cast<std::uint16_t>(rx.used[k].token)), 1);
    for (std::size_t k = 0; k < n; ++k) {
      const virtq::DriverQueue::Used& u = rx.used[k];
      const auto b = static_cast<std::uint16_t>(u.token);
      std::uint8_t* p = rx.data(b);
      std::uint16_t nbuf = 1;
      if (mrg_rxbuf_ && u.len >= hdr_len_) {
        std::memcpy(&nbuf, p + offsetof(virtio::VirtioNetHdrMrg, num_buffers), sizeof nbuf);
      }
      if (rx.merge_left == 0 && u.len > hdr_len_ && nbuf == 1) {
        // The whole frame in this buffer: it goes back out from where it is.
        ++rx.stats.frames;
        rx.stats.bytes += u.len - hdr_len_;
        ++seen;
        std::memset(p, 0, hdr_len_);
        if (add_tx(tx, txq, rx.data_gpa(b), u.len, kLentToken | b)) {
          ++sent;
        } else {
          rx.free[rx.free_top++] = b;  // the transmitq is full: dropped, counted there
        }
        continue;
      }
      // A frame gathered from several buffers, an empty or a bad one: the rx path's way. A
      // gathered frame is larger than any one buffer, so it cannot go back out: dropped as
      // oversize; an empty one, as bad.
      std::span<const std::uint8_t> frame;
      if (deliver_buffer(rx, u, frame)) {
        ++rx.stats.frames;
        rx.stats.bytes += frame.size();
        ++seen;
        ++(frame.empty() ? rx.stats.bad : tx.stats.oversize);
      }
      rx.free[rx.free_top++] = b;
    }
    if (n < want || n == 0) break;
  }
  if (sent != 0) {
    txq.publish();
    kick_if_needed(tx, txq);
  }
  refill_rx(rx, rxq);
  return sent;
}

inline std::size_t NetDriver::forward(std::uint16_t qp, std::size_t max) noexcept {
  if (session_->stopped()) return 0;
  vhost_user::FrontendRing& txr = *tx_ring(qp).ring;
  vhost_user::FrontendRing& rxr = *rx_ring(qp).ring;
  // Both rings of a session run the same layout.
  return txr.visit([&]<typename Q>(Q& txq) { return forward_on(qp, txq, rxr.ring<Q>(), max); });
}

template <typename OnFrame>
std::size_t NetDriver::rx_burst(std::uint16_t qp, std::size_t max, OnFrame&& on_frame) noexcept {
  NetRing& r = rx_ring(qp);
  if (session_->stopped()) return 0;
  return r.ring->visit([&](auto& vq) { return rx_burst_on(r, vq, max, on_frame); });
}

}  // namespace vhostkit::driver
