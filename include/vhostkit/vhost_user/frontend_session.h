// The vhost-user front-end (a userspace virtio-net driver, what DPDK calls virtio-user): connects
// to any vhost-user back-end, negotiates features, shares one memfd as "guest" memory, sets up
// the rings with kick/call eventfds and drives the driver side of every ring.
//
// The same session also drives a virtio-blk back-end (FrontendOptions::device = blk): then the
// rings are num_queues request queues, each with a pool of request buffers that nothing is
// posted from at setup; BlkFrontend (blk_frontend.h) builds requests on it.
//
// Memory: one memfd region mapped MAP_SHARED at guest-physical address 0, so a GPA is an offset
// into our mapping. Rings come first (one page-aligned DriverRingLayout block per ring), then a
// packet buffer pool: `queue_size` fixed-size buffers per ring, owned by that ring for the whole
// session. The rx ring is filled with all of its buffers at setup and refilled as frames are
// consumed; tx takes buffers from a free stack and returns them when the device hands the chain
// back. Nothing on the data path allocates or throws.
//
// Queue numbering (virtio 1.2, 5.1.2): ring 2p is pair p's receiveq, ring 2p+1 its transmitq.
//
// Everything the back-end sends is hostile: each reply is decoded by the codec (request number,
// REPLY flag, exact size, no fds) and then checked against what we asked (GET_VRING_BASE for the
// ring we named, queue counts in range). A failed step returns an Error naming the request; a
// back-end that does not answer costs at most FrontendOptions::timeout per step.
//
// Threading: one thread drives the control path. The data path of different rings may run on
// different threads; one ring is used by one thread at a time.
#pragma once

#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

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

#include "vhostkit/error.h"
#include "vhostkit/unique_fd.h"
#include "vhostkit/vhost_user/channel.h"
#include "vhostkit/vhost_user/message.h"
#include "vhostkit/vhost_user/protocol.h"
#include "vhostkit/virtio/blk.h"
#include "vhostkit/virtio/features.h"
#include "vhostkit/virtio/net.h"
#include "vhostkit/virtq/split_queue.h"

namespace vhostkit::vhost_user {

// Feature bits we ask a net back-end for by default (MQ is added when queue_pairs > 1).
inline constexpr std::uint64_t kFrontendNetFeatures =
    virtio::bit(virtio::feature::version_1) | virtio::bit(virtio::feature::ring_event_idx) |
    virtio::bit(virtio::net_feature::mrg_rxbuf) | virtio::bit(virtio::net_feature::mac) |
    virtio::bit(virtio::net_feature::status);

// Feature bits this driver knows how to drive: anything else is never acked, even if asked for.
// (No offloads: we never build GSO frames or checksum-offload headers.)
inline constexpr std::uint64_t kFrontendDrivableFeatures =
    kFrontendNetFeatures | virtio::bit(virtio::net_feature::mq) |
    virtio::bit(virtio::net_feature::mtu) | virtio::bit(virtio::feature::any_layout) |
    virtio::bit(virtio::feature::protocol_features);

// The same for a blk back-end (MQ is added when num_queues > 1). SEG_MAX, BLK_SIZE and RO only
// let the device tell us its limits (RO: writes will fail); FLUSH lets us ask for one.
inline constexpr std::uint64_t kFrontendBlkFeatures =
    virtio::bit(virtio::feature::version_1) | virtio::bit(virtio::feature::ring_event_idx) |
    virtio::bit(virtio::blk_feature::seg_max) | virtio::bit(virtio::blk_feature::blk_size) |
    virtio::bit(virtio::blk_feature::ro) | virtio::bit(virtio::blk_feature::flush) |
    virtio::bit(virtio::blk_feature::size_max);
inline constexpr std::uint64_t kFrontendBlkDrivableFeatures =
    kFrontendBlkFeatures | virtio::bit(virtio::blk_feature::mq) |
    virtio::bit(virtio::feature::protocol_features);

// Protocol features we use when the back-end offers them.
inline constexpr std::uint64_t kFrontendProtocolFeatures =
    (std::uint64_t{1} << protocol_feature::mq) | (std::uint64_t{1} << protocol_feature::reply_ack) |
    (std::uint64_t{1} << protocol_feature::config);

struct FrontendOptions {
  enum class Notify : std::uint8_t {
    event,  // kick and call eventfds: each side sleeps until the other signals
    poll,   // "no fd" for kick and call: the back-end polls the avail ring, we poll used
  };

  enum class Device : std::uint8_t { net, blk };

  Device device = Device::net;
  // Where to connect, unless `channel` is already connected (tests, or a front-end that listens
  // and lets the back-end connect as a client).
  std::string socket_path;
  Channel channel;

  std::uint16_t queue_pairs = 1;        // net: 1..128; rings = 2 * queue_pairs
  std::uint16_t num_queues = 1;         // blk: request queues, 1..128; rings = num_queues
  std::uint16_t queue_size = 256;       // power of two, 2..32768
  std::size_t memory_size = 64u << 20;  // the shared region; 0: just what rings + buffers need
  // net: per packet buffer, >= 64 (header + a minimal frame). blk: per request buffer, 512 B..
  // 16 MiB + 4 KiB; a multiple of 4096 keeps every buffer page-aligned (O_DIRECT back-ends).
  std::uint32_t buffer_size = 2048;
  // Buffers per ring; 0: queue_size. (net always has queue_size.)
  std::uint16_t ring_buffers = 0;
  // Feature bits wanted (acked = wanted & offered & drivable). Unset: kFrontendNetFeatures plus
  // MQ when queue_pairs > 1 (blk: kFrontendBlkFeatures plus MQ when num_queues > 1).
  std::optional<std::uint64_t> features;
  std::uint64_t protocol_features = kFrontendProtocolFeatures;
  Notify notify = Notify::event;
  // Bound on each control-path step (send, or wait for a reply).
  std::chrono::milliseconds timeout{2000};
  std::string name = "frontend";  // in log lines

  // Checks everything above that does not need the back-end. connect() calls it.
  Result<> validate() const;
  std::uint16_t rings() const noexcept {
    return device == Device::blk ? num_queues : static_cast<std::uint16_t>(2u * queue_pairs);
  }
  std::uint16_t buffers_per_ring() const noexcept {
    return device == Device::blk && ring_buffers != 0 ? ring_buffers : queue_size;
  }
};

// Per-ring counters; written by the ring's data-path thread only.
struct RingStats {
  std::uint64_t frames = 0;     // tx: frames placed on the ring; rx: frames delivered
  std::uint64_t bytes = 0;      // frame bytes (virtio-net header excluded)
  std::uint64_t completed = 0;  // tx: chains the device returned
  std::uint64_t kicks = 0;      // kick eventfd writes
  std::uint64_t calls = 0;      // call eventfd wake-ups consumed
  std::uint64_t full = 0;       // tx: frames refused for lack of a free buffer
  std::uint64_t oversize = 0;   // tx: frames larger than a buffer (dropped)
  std::uint64_t bad = 0;        // rx: used entries we could not make a frame of
};

// One ring and its buffers. Public so a benchmark can run its own loop on the DriverQueue.
struct FrontendRing {
  std::uint16_t index = 0;
  bool is_rx = false;
  virtq::DriverQueue vq;
  UniqueFd kick;                    // invalid in poll mode
  UniqueFd call;                    // invalid in poll mode
  std::uint8_t* buffers = nullptr;  // host address of buffer 0
  std::uint64_t buffers_gpa = 0;
  std::uint32_t buffer_size = 0;
  std::uint16_t buffer_count = 0;
  // tx: free buffer indices (a stack). rx: buffers waiting to be given back to the ring.
  std::vector<std::uint16_t> free;
  std::uint16_t free_top = 0;
  std::vector<virtq::DriverQueue::Used> used;  // scratch for get_used_burst
  // rx with MRG_RXBUF: a frame spread over several buffers is gathered here.
  std::vector<std::uint8_t> merge;
  std::size_t merge_len = 0;
  std::uint16_t merge_left = 0;  // buffers still to come for the frame being gathered
  bool merge_bad = false;        // the frame being gathered did not fit: drop it at its end
  RingStats stats;

  std::uint8_t* buffer(std::uint16_t i) const noexcept {
    return buffers + std::size_t{i} * buffer_size;
  }
  std::uint64_t buffer_gpa(std::uint16_t i) const noexcept {
    return buffers_gpa + std::uint64_t{i} * buffer_size;
  }
};

class FrontendSession {
 public:
  static constexpr std::uint16_t kMaxQueuePairs = 128;
  static constexpr std::size_t kBurst = 64;  // used entries reclaimed per step

  // Connects (or takes opts.channel), negotiates and starts every ring. On failure everything
  // acquired so far is released and the error names the step that failed.
  static Result<std::unique_ptr<FrontendSession>> connect(FrontendOptions opts);

  ~FrontendSession();  // close()
  FrontendSession(const FrontendSession&) = delete;
  FrontendSession& operator=(const FrontendSession&) = delete;

  // ---- What was negotiated ----
  std::uint64_t offered_features() const noexcept { return offered_features_; }
  std::uint64_t features() const noexcept { return features_; }  // acked
  std::uint64_t offered_protocol_features() const noexcept { return offered_protocol_; }
  std::uint64_t protocol_features() const noexcept { return protocol_; }  // acked
  bool has_protocol(unsigned bit) const noexcept { return (protocol_ >> bit) & 1u; }
  // GET_QUEUE_NUM's answer (0 if MQ was not negotiated).
  std::uint64_t backend_queue_num() const noexcept { return backend_queue_num_; }
  std::uint16_t queue_pairs() const noexcept { return opts_.queue_pairs; }
  FrontendOptions::Device device() const noexcept { return opts_.device; }
  std::uint16_t num_rings() const noexcept { return static_cast<std::uint16_t>(rings_.size()); }
  std::uint16_t queue_size() const noexcept { return opts_.queue_size; }
  std::size_t net_hdr_len() const noexcept { return hdr_len_; }
  // Largest frame tx_burst accepts (a buffer minus the virtio-net header).
  std::size_t max_frame() const noexcept { return opts_.buffer_size - hdr_len_; }
  FrontendOptions::Notify notify() const noexcept { return opts_.notify; }
  std::span<std::uint8_t> memory() const noexcept { return {base_, mem_size_}; }
  int socket_fd() const noexcept { return channel_.fd(); }

  // ---- Control path ----
  // GET_CONFIG (needs the CONFIG protocol feature).
  Result<std::vector<std::uint8_t>> get_config(std::uint32_t offset, std::uint32_t size);
  // The MAC from config space (needs CONFIG and VIRTIO_NET_F_MAC).
  Result<std::array<std::uint8_t, 6>> mac();
  // GET_VRING_BASE on every ring (the back-end stops them); returns each ring's last_avail_idx.
  // After this the data path must not be used. Idempotent: a second call returns the same.
  Result<std::vector<std::uint32_t>> stop();
  // Stops the rings if the connection is still healthy, then closes the socket, unmaps memory
  // and closes every fd. Idempotent.
  void close() noexcept;

  // ---- Data path (noexcept, allocation-free) ----
  static constexpr std::uint16_t rx_index(std::uint16_t qp) noexcept {
    return static_cast<std::uint16_t>(2u * qp);
  }
  static constexpr std::uint16_t tx_index(std::uint16_t qp) noexcept {
    return static_cast<std::uint16_t>(2u * qp + 1);
  }
  FrontendRing& tx_ring(std::uint16_t qp) noexcept { return rings_[tx_index(qp)]; }
  FrontendRing& rx_ring(std::uint16_t qp) noexcept { return rings_[rx_index(qp)]; }
  FrontendRing& ring(std::uint16_t i) noexcept { return rings_[i]; }
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

  // Returns finished tx chains' buffers to the free stack; how many.
  std::size_t reclaim_tx(std::uint16_t qp) noexcept;
  // Kicks ring i if the device asked for it (EVENT_IDX / NO_NOTIFY). True if kicked.
  bool kick_if_needed(std::uint16_t ring) noexcept;
  // Kicks unconditionally (no-op in poll mode).
  void kick(std::uint16_t ring) noexcept;
  // Event mode: re-enables call notifications on ring i and sleeps until the device calls or
  // `timeout` passes. Returns true if used entries are (probably) waiting. Poll mode: returns
  // at once whether used entries are waiting.
  bool wait_call(std::uint16_t ring, std::chrono::milliseconds timeout) noexcept;

 private:
  FrontendSession() = default;
  struct Setup;
  Result<> negotiate();
  Result<> setup_memory();
  Result<> setup_ring(std::uint16_t i);
  Result<> enable_rings();

  // Sends a request that has no reply body; with REPLY_ACK negotiated sets NEED_REPLY and
  // waits for the ack. `what` names the step in errors ("SET_VRING_NUM ring 3").
  template <typename T>
  Result<> request(T& msg, std::string_view what);
  // Sends a GET_* request and returns its decoded reply message.
  Result<Received> query(Request req, std::string_view what);
  Result<Received> recv_reply(Request req, std::string_view what);
  Result<std::uint64_t> query_u64(Request req);
  Error step_error(std::string_view what, const Error& e) const;

  void refill_rx(FrontendRing& r) noexcept;
  bool deliver_buffer(FrontendRing& r, const virtq::DriverQueue::Used& u,
                      std::span<const std::uint8_t>& frame) noexcept;

  FrontendOptions opts_;
  Channel channel_;
  UniqueFd memfd_;
  std::uint8_t* base_ = nullptr;
  std::size_t mem_size_ = 0;
  std::uint64_t offered_features_ = 0;
  std::uint64_t features_ = 0;
  std::uint64_t offered_protocol_ = 0;
  std::uint64_t protocol_ = 0;
  std::uint64_t backend_queue_num_ = 0;
  std::size_t hdr_len_ = sizeof(virtio::VirtioNetHdrMrg);
  bool mrg_rxbuf_ = false;
  bool healthy_ = true;  // false after a control-path error: close() then skips GET_VRING_BASE
  bool stopped_ = false;
  std::vector<std::uint32_t> stopped_bases_;
  std::vector<FrontendRing> rings_;
};

// ---- Inline data path ----

inline void FrontendSession::kick(std::uint16_t i) noexcept {
  FrontendRing& r = rings_[i];
  if (!r.kick.valid()) return;
  const std::uint64_t one = 1;
  // A full counter (EAGAIN) still leaves the eventfd readable: the kick is not lost.
  [[maybe_unused]] ssize_t n = ::write(r.kick.get(), &one, sizeof one);
  ++r.stats.kicks;
}

inline bool FrontendSession::kick_if_needed(std::uint16_t i) noexcept {
  FrontendRing& r = rings_[i];
  if (!r.kick.valid() || !r.vq.needs_kick()) return false;
  kick(i);
  return true;
}

inline std::size_t FrontendSession::reclaim_tx(std::uint16_t qp) noexcept {
  FrontendRing& r = tx_ring(qp);
  std::size_t total = 0;
  for (;;) {
    const std::size_t n = r.vq.get_used_burst(r.used);
    for (std::size_t k = 0; k < n; ++k) {
      r.free[r.free_top++] = static_cast<std::uint16_t>(r.used[k].token);
    }
    total += n;
    if (n < r.used.size()) break;
  }
  r.stats.completed += total;
  return total;
}

template <typename Fill>
std::size_t FrontendSession::tx_burst_fill(std::uint16_t qp, std::size_t n, Fill&& fill) noexcept {
  FrontendRing& r = tx_ring(qp);
  if (stopped_) return 0;
  if (r.free_top < n) reclaim_tx(qp);
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
    const virtq::DriverQueue::Buffer out{r.buffer_gpa(b),
                                         static_cast<std::uint32_t>(hdr_len_ + len)};
    if (!r.vq.add(std::span(&out, 1), {}, b)) {
      ++r.stats.full;
      break;
    }
    --r.free_top;
    ++r.stats.frames;
    r.stats.bytes += len;
    ++added;
  }
  if (added != 0) {
    r.vq.publish();
    kick_if_needed(r.index);
  }
  return done;
}

inline std::size_t FrontendSession::tx_burst(
    std::uint16_t qp, std::span<const std::span<const std::uint8_t>> frames) noexcept {
  const std::size_t room = max_frame();
  return tx_burst_fill(qp, frames.size(), [&](std::size_t i, std::span<std::uint8_t> out) {
    const auto& f = frames[i];
    if (f.size() > room) return room + 1;  // counted as oversize, skipped
    std::memcpy(out.data(), f.data(), f.size());
    return f.size();
  });
}

template <typename OnFrame>
std::size_t FrontendSession::rx_burst(std::uint16_t qp, std::size_t max,
                                      OnFrame&& on_frame) noexcept {
  FrontendRing& r = rx_ring(qp);
  if (stopped_) return 0;
  std::size_t delivered = 0;
  while (delivered < max) {
    const std::size_t want = std::min(r.used.size(), max - delivered);
    const std::size_t n = r.vq.get_used_burst(std::span(r.used.data(), want));
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
  refill_rx(r);
  return delivered;
}

}  // namespace vhostkit::vhost_user
