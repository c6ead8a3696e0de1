// A userspace virtio-blk driver over a vhost-user front-end (FrontendSession, the protocol side:
// negotiation, the shared memfd, the ring setup). It reads the disk's geometry from config space
// (GET_CONFIG) and puts requests on N request queues.
//
// Each queue owns `depth` request slots in its ring's area of the shared memory; a slot holds
// one request at a time:
//
//   +0          data, max_data bytes (page-aligned, so an O_DIRECT back-end can use it as is)
//   +max_data   the 16-byte request header (virtio_blk_outhdr)
//   +max_data+16  the status byte the device writes last
//
// A request is a chain of three descriptors (header, data, status) or two (FLUSH: header,
// status), so a ring of queue_size holds at most queue_size / 3 requests; connect() makes the
// ring big enough for `depth`.
//
// Everything the back-end sends is hostile: config fields are checked before use (a zero
// capacity, a blk_size that is not a power of two in 512..64 KiB, fewer queues than we asked
// for fail connect()); a used element is matched to a slot by the chain's token (DriverQueue
// ignores ids we did not post); a used length of 0 means the status was never written and is
// reported as kStatusNotWritten.
//
// Ring layout: split or packed (BlkDriverOptions::ring), with or without IN_ORDER, whatever the
// back-end agreed to. A packed ring of queue_size also holds queue_size / 3 requests (no
// indirect tables). submit() looks at the layout once per request and complete() once per
// burst; the work on descriptors is a copy made for that layout.
//
// Threading: one thread drives the control path; each queue's data path may run on its own
// thread, one thread per queue.
#pragma once

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
#include "vhostkit/virtio/blk.h"
#include "vhostkit/virtio/features.h"

namespace vhostkit::driver {

// Feature bits we ask a blk back-end for by default (MQ is added when num_queues > 1).
// SEG_MAX, BLK_SIZE and RO only let the device tell us its limits (RO: writes will fail);
// FLUSH lets us ask for one.
inline constexpr std::uint64_t kBlkFeatures =
    virtio::bit(virtio::feature::version_1) | virtio::bit(virtio::feature::ring_event_idx) |
    virtio::bit(virtio::blk_feature::seg_max) | virtio::bit(virtio::blk_feature::blk_size) |
    virtio::bit(virtio::blk_feature::ro) | virtio::bit(virtio::blk_feature::flush) |
    virtio::bit(virtio::blk_feature::size_max);
// Feature bits this driver knows how to drive: anything else is never acked.
inline constexpr std::uint64_t kBlkDrivableFeatures =
    kBlkFeatures | virtio::bit(virtio::blk_feature::mq) |
    virtio::bit(virtio::feature::protocol_features) | virtio::bit(virtio::feature::ring_packed) |
    virtio::bit(virtio::feature::in_order);

struct BlkDriverOptions {
  // Where to connect, unless `channel` is already connected.
  std::string socket_path;
  vhost_user::Channel channel;

  std::uint16_t num_queues = 1;   // request queues, 1..BlkDriver::kMaxQueues
  std::uint16_t depth = 32;       // request slots per queue (requests in flight), 1..kMaxDepth
  std::uint16_t queue_size = 0;   // ring size; 0: the smallest power of two >= 3 * depth, >= 64
  std::uint32_t max_data = 4096;  // data bytes per request: a multiple of 512, 512..16 MiB
  vhost_user::FrontendOptions::Notify notify = vhost_user::FrontendOptions::Notify::event;
  // Feature bits wanted; unset: kBlkFeatures (+ MQ when num_queues > 1).
  std::optional<std::uint64_t> features;
  // Asks for the packed ring and for VIRTIO_F_IN_ORDER on top of `features`; either is acked
  // only if the back-end offers it.
  vhost_user::RingLayout ring = vhost_user::RingLayout::split;
  bool in_order = false;
  std::chrono::milliseconds timeout{2000};
  std::string name = "blk-frontend";

  // The FrontendOptions these become (checks the blk-specific fields first).
  Result<vhost_user::FrontendOptions> session_options() &&;
};

// The disk as config space describes it, checked.
struct BlkInfo {
  std::uint64_t capacity = 0;    // 512-byte sectors
  std::uint32_t blk_size = 512;  // logical block size (BLK_SIZE), 512 if not offered
  std::uint32_t seg_max = 0;     // data segments per request (SEG_MAX); 0: no limit stated
  std::uint32_t size_max = 0;    // bytes per data segment (SIZE_MAX); 0: no limit stated
  std::uint16_t num_queues = 1;  // the device's request queues (MQ); 1 if not offered
  bool read_only = false;        // VIRTIO_BLK_F_RO acked
  bool flush = false;            // VIRTIO_BLK_F_FLUSH acked
};

// Per-queue counters; written by the queue's data-path thread only.
struct BlkQueueStats {
  std::uint64_t requests = 0;   // requests put on the ring
  std::uint64_t bytes = 0;      // data bytes of those requests
  std::uint64_t completed = 0;  // requests the device returned
};

class BlkDriver {
 public:
  static constexpr std::uint16_t kMaxQueues = 128;
  static constexpr std::uint16_t kMaxDepth = 8192;
  static constexpr std::size_t kBurst = 64;  // used entries reclaimed per step
  static constexpr std::uint32_t kMaxData = 16u << 20;
  // The status a slot reports when the device returned it without writing a status byte.
  static constexpr std::uint8_t kStatusNotWritten = 0xff;
  // The config bytes we read: everything up to and including num_queues.
  static constexpr std::uint32_t kConfigBytes = offsetof(virtio::VirtioBlkConfig, num_queues) + 2;

  static Result<std::unique_ptr<BlkDriver>> connect(BlkDriverOptions opts);
  // Bytes of shared memory one request slot takes (data, header, status, page-aligned).
  static std::uint32_t slot_bytes(std::uint32_t max_data) noexcept;
  // Checks raw config bytes (at least kConfigBytes) against the acked features. Public so the
  // hostile cases can be tested without a back-end.
  static Result<BlkInfo> parse_config(std::span<const std::uint8_t> config, std::uint64_t features);

  ~BlkDriver() = default;  // the session closes itself
  BlkDriver(const BlkDriver&) = delete;
  BlkDriver& operator=(const BlkDriver&) = delete;

  const BlkInfo& info() const noexcept { return info_; }
  vhost_user::FrontendSession& session() noexcept { return *session_; }
  std::uint16_t num_queues() const noexcept { return session_->num_rings(); }
  std::uint16_t depth() const noexcept { return depth_; }
  std::uint32_t max_data() const noexcept { return max_data_; }
  vhost_user::RingLayout layout() const noexcept { return session_->layout(); }
  bool in_order() const noexcept { return session_->in_order(); }

  // ---- Data path (noexcept, allocation-free; queue q from one thread at a time) ----
  // A free slot of queue q, or -1 when all `depth` are in flight.
  int acquire(std::uint16_t q) noexcept;
  // Returns an acquired slot unused (submit() failed, or the caller changed its mind).
  void release(std::uint16_t q, std::uint16_t slot) noexcept;
  // The slot's data area (max_data bytes): fill it before submitting a write; read it after an
  // IN completed.
  std::uint8_t* data(std::uint16_t q, std::uint16_t slot) noexcept;
  // Puts a request on an acquired slot onto queue q's avail ring (not yet visible: publish()).
  // type is a virtio::blk_type; len (0 for FLUSH, else a multiple of 512 up to max_data) bytes
  // of data go out for OUT and come in for IN. False (slot still acquired) if len is bad or
  // the ring is full.
  bool submit(std::uint16_t q, std::uint16_t slot, std::uint32_t type, std::uint64_t sector,
              std::uint32_t len) noexcept;
  // Makes submitted requests visible and kicks if the device wants it.
  void publish(std::uint16_t q) noexcept;
  // Calls on_done(slot, status) for each finished request (up to kBurst per
  // round, until none is left), then frees its slot. Returns how many finished.
  template <typename OnDone>
  std::size_t complete(std::uint16_t q, OnDone&& on_done) noexcept;
  // Requests of queue q in flight.
  std::uint16_t inflight(std::uint16_t q) const noexcept { return queues_[q].in_use(); }
  // Event mode: arm call notifications and sleep until the device calls or timeout. Busy
  // mode keeps them off: see disable_calls().
  bool wait_call(std::uint16_t q, std::chrono::milliseconds timeout) noexcept {
    return session_->wait_call(q, timeout);
  }
  // Asks the device not to call on queue q (a busy-polling driver reads the used ring anyway).
  void disable_calls(std::uint16_t q) noexcept { session_->ring(q).disable_interrupts(); }
  const BlkQueueStats& stats(std::uint16_t q) const noexcept { return queues_[q].stats; }

  // Stops every ring (GET_VRING_BASE); the data path is inert afterwards.
  Result<std::vector<std::uint32_t>> stop();

 private:
  // A request queue's slots (RingBuffers: one buffer per slot) and counters.
  struct Queue : RingBuffers {
    BlkQueueStats stats;
  };

  BlkDriver() = default;
  template <typename Q>
  bool submit_on(Q& vq, Queue& r, std::uint16_t slot, std::uint32_t type, std::uint32_t len,
                 std::uint64_t gpa) noexcept;
  template <typename Q, typename OnDone>
  std::size_t complete_on(Q& vq, std::uint16_t q, OnDone& on_done) noexcept;
  std::uint8_t* status_byte(std::uint16_t q, std::uint16_t slot) noexcept {
    return data(q, slot) + max_data_ + sizeof(virtio::VirtioBlkOutHdr);
  }

  std::unique_ptr<vhost_user::FrontendSession> session_;
  std::vector<Queue> queues_;
  BlkInfo info_;
  std::uint16_t depth_ = 0;
  std::uint32_t max_data_ = 0;
  bool stopped_ = false;
};

// ---- Inline data path ----

inline int BlkDriver::acquire(std::uint16_t q) noexcept {
  Queue& r = queues_[q];
  if (stopped_ || r.free_top == 0) return -1;
  return r.free[--r.free_top];
}

inline void BlkDriver::release(std::uint16_t q, std::uint16_t slot) noexcept {
  Queue& r = queues_[q];
  r.free[r.free_top++] = slot;
}

inline std::uint8_t* BlkDriver::data(std::uint16_t q, std::uint16_t slot) noexcept {
  return queues_[q].buffer(slot);
}

template <typename Q>
bool BlkDriver::submit_on(Q& vq, Queue& r, std::uint16_t slot, std::uint32_t type,
                          std::uint32_t len, std::uint64_t gpa) noexcept {
  using Buffer = virtq::DriverQueue::Buffer;
  const Buffer header{gpa + max_data_, sizeof(virtio::VirtioBlkOutHdr)};
  const Buffer payload{gpa, len};
  const Buffer status{gpa + max_data_ + sizeof(virtio::VirtioBlkOutHdr), 1};
  std::expected<std::uint16_t, Errc> head;
  if (len == 0) {
    head = vq.add(std::span(&header, 1), std::span(&status, 1), slot);
  } else if (type == virtio::blk_type::out) {
    const Buffer out[2] = {header, payload};
    head = vq.add(out, std::span(&status, 1), slot);
  } else {
    const Buffer in[2] = {payload, status};
    head = vq.add(std::span(&header, 1), in, slot);
  }
  if (!head) return false;
  ++r.stats.requests;
  r.stats.bytes += len;
  return true;
}

inline bool BlkDriver::submit(std::uint16_t q, std::uint16_t slot, std::uint32_t type,
                              std::uint64_t sector, std::uint32_t len) noexcept {
  if (stopped_ || len > max_data_ || len % virtio::kBlkSectorSize != 0) return false;
  if ((type == virtio::blk_type::flush) != (len == 0)) return false;
  Queue& r = queues_[q];
  const virtio::VirtioBlkOutHdr hdr{type, 0, sector};
  std::memcpy(data(q, slot) + max_data_, &hdr, sizeof hdr);
  *status_byte(q, slot) = kStatusNotWritten;
  const std::uint64_t gpa = r.buffer_gpa(slot);
  return r.ring->visit([&](auto& vq) { return submit_on(vq, r, slot, type, len, gpa); });
}

inline void BlkDriver::publish(std::uint16_t q) noexcept {
  if (stopped_) return;
  session_->ring(q).visit([](auto& vq) { vq.publish(); });
  session_->kick_if_needed(q);
}

template <typename Q, typename OnDone>
std::size_t BlkDriver::complete_on(Q& vq, std::uint16_t q, OnDone& on_done) noexcept {
  Queue& r = queues_[q];
  std::size_t total = 0;
  for (;;) {
    const std::size_t n = vq.get_used_burst(r.used);
    for (std::size_t k = 0; k < n; ++k) {
      // The token is a slot we posted: the queue only returns chains it has in flight.
      const auto slot = static_cast<std::uint16_t>(r.used[k].token);
      // The device writes the status byte last and counts it in len: len 0 means it never did.
      const std::uint8_t status = r.used[k].len == 0 ? kStatusNotWritten : *status_byte(q, slot);
      on_done(slot, status);
      r.free[r.free_top++] = slot;
    }
    total += n;
    if (n < r.used.size()) break;
  }
  r.stats.completed += total;
  return total;
}

template <typename OnDone>
std::size_t BlkDriver::complete(std::uint16_t q, OnDone&& on_done) noexcept {
  if (stopped_) return 0;
  return queues_[q].ring->visit([&](auto& vq) { return complete_on(vq, q, on_done); });
}

}  // namespace vhostkit::driver
