// vhost::Queue: the vhost_virtqueue analogue: the ring's addresses and state as the frontend
// configured them, its kick/call/err eventfds, the running ring (split virtq::DeviceQueue or
// packed virtq::PackedDeviceQueue, chosen by VIRTIO_F_RING_PACKED when it starts), and its
// counters.
#pragma once

#include <atomic>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "vhostkit/error.h"
#include "vhostkit/memory/guest_memory.h"
#include "vhostkit/thread_annotations.h"
#include "vhostkit/unique_fd.h"
#include "vhostkit/vhost/inflight.h"
#include "vhostkit/virtq/packed_queue.h"
#include "vhostkit/virtq/split_queue.h"

namespace vhostkit::vhost {

// A ring's addresses translated into one memory table: each part inside one region, aligned in
// host memory as the ring's index words need. Only vhost::Device makes one, once per set of
// addresses, size and table; a ring starts (virtq::DeviceQueue::attach) from it as it is.
// One of the two layouts, as the acked VIRTIO_F_RING_PACKED said when it was translated.
struct MappedRing {
  bool packed = false;
  virtq::SplitRing parts;          // split: desc table, avail ring, used ring
  virtq::PackedRing packed_parts;  // packed: desc ring, driver and device event suppression
  // Where the device writes in guest memory, for the dirty log: split, the used ring; packed,
  // the descriptor ring (used descriptors overwrite available ones) and the device event area.
  std::uint64_t used_gpa = 0;
  std::uint64_t desc_gpa = 0;
  std::uint64_t device_event_gpa = 0;
};

// The one counter type for statistics (per-queue stats here, the net device's per-pair
// counters, blk's). One thread writes it at a time (the worker serving the queue) and any thread
// reads it. With one writer a relaxed load and store lose no count, and the data path
// pays no locked read-modify-write per burst; a reader sees every count, if slightly late.
class Counter {
 public:
  void add(std::uint64_t n = 1) noexcept {
    if (n != 0) v_.store(v_.load(std::memory_order_relaxed) + n, std::memory_order_relaxed);
  }
  std::uint64_t load() const noexcept { return v_.load(std::memory_order_relaxed); }
  void clear() noexcept { v_.store(0, std::memory_order_relaxed); }

 private:
  std::atomic<std::uint64_t> v_{0};
};

// Per-queue counters of the ring itself, since the queue was last reset. Device-level events
// (virtio-net's frames, bytes and drops) are counted once, by the device (NetDevice::stats).
struct QueueStats {
  Counter chains;  // chains popped by a backend that counts them (blk, net's transmitq, rigs)
  Counter bytes;   // bytes moved, by a backend that counts them (blk, the rigs)
  Counter kicks;   // kick eventfd wake-ups received
  Counter calls;   // call eventfd signals sent
  Counter errors;  // bad chains (kinds in DeviceQueue::errors())

  void add(Counter& c, std::uint64_t n = 1) noexcept { c.add(n); }
  void clear() noexcept {
    for (Counter* c : {&chains, &bytes, &kicks, &calls, &errors}) c->clear();
  }
};

class Queue {
 public:
  std::uint16_t index() const noexcept { return index_; }
  // For the device's handlers (DeviceBackend::handle_queue and the queue_* hooks), which run as
  // the queue's worker; vhost::Device's own code is checked against worker_role_ instead.
  // The running ring's layout: fixed from its start to its stop.
  bool packed() const noexcept VHOSTKIT_NO_THREAD_SAFETY_ANALYSIS { return packed_; }
  // The split ring (serves when !packed()) and the packed one (when packed()).
  virtq::DeviceQueue& vq() noexcept VHOSTKIT_NO_THREAD_SAFETY_ANALYSIS { return vq_; }
  virtq::PackedDeviceQueue& packed_vq() noexcept VHOSTKIT_NO_THREAD_SAFETY_ANALYSIS { return pvq_; }
  // The running ring as its own type, for handlers written once as templates over
  // virtq::DeviceRing: ring<virtq::DeviceQueue>() or ring<virtq::PackedDeviceQueue>().
  template <virtq::DeviceRing R>
  R& ring() noexcept VHOSTKIT_NO_THREAD_SAFETY_ANALYSIS {
    if constexpr (std::is_same_v<R, virtq::PackedDeviceQueue>) {
      return pvq_;
    } else {
      return vq_;
    }
  }
  // Calls f with the running ring: one branch per call, then f runs on the concrete type with
  // no virtual call per chain. Both instantiations of f must return the same type.
  template <class F>
  decltype(auto) visit(F&& f) noexcept VHOSTKIT_NO_THREAD_SAFETY_ANALYSIS {
    if (packed_) return std::forward<F>(f)(pvq_);
    return std::forward<F>(f)(vq_);
  }
  QueueStats& stats() noexcept { return stats_; }
  const QueueStats& stats() const noexcept { return stats_; }
  // Running on its worker. Read from any thread (the worker clears it when the ring breaks).
  bool started() const noexcept { return started_.load(std::memory_order_acquire); }
  // The ring broke the protocol and was stopped (sticky until reset or a restart).
  bool broken() const noexcept { return broken_.load(std::memory_order_acquire); }
  // The configured ring size (SET_VRING_NUM), 0 before. Any thread.
  std::uint32_t ring_size() const noexcept { return size_seen_.load(std::memory_order_relaxed); }
  bool is_enabled() const noexcept { return enabled; }

  // Inflight I/O tracking (vhost-user INFLIGHT_SHMFD), for the device's handlers on the worker:
  // the ring's part of the device's region while the ring runs with one, nullptr otherwise.
  // Record each request with submit(head) before it starts (not a resubmitted one: it keeps
  // its place in the order) and used(head) as its used entry is pushed, bad chains included;
  // publish_and_notify() reports the publication.
  InflightSplitQueue* inflight() noexcept VHOSTKIT_NO_THREAD_SAFETY_ANALYSIS { return inflight_; }
  // The heads a previous back-end left in flight, in their original order, found when the ring
  // started (popping resumes after them): resubmit them (virtq::DeviceQueue::take) before any
  // new chain. Handed over once.
  std::vector<std::uint16_t> take_resubmit() noexcept VHOSTKIT_NO_THREAD_SAFETY_ANALYSIS {
    return std::exchange(resubmit_, {});
  }

  // Publishes used entries and signals the call eventfd if the driver wants it (EVENT_IDX or
  // NO_INTERRUPT decide). Called by device handlers after a batch, on the worker.
  void publish_and_notify() noexcept;
  // Signals the call eventfd unconditionally (config changes; tests, with the ring quiet).
  void signal() noexcept;
  // Asks the queue's worker to serve the ring again, as a kick from the driver would: for a
  // device that left chains on a running ring until something else was ready (the loopback's
  // transmitq waits for its receiveq). On the queue's worker, while the ring runs; a ring
  // without a kick fd is polled anyway.
  void rekick() noexcept;
  // Back to the state of a queue no front-end has configured: fds closed, addresses, size,
  // base, flags and counters cleared; the index stays. Only for a stopped ring (RESET_OWNER,
  // the end of a session): the worker must no longer touch it.
  void reset() noexcept;

 private:
  friend class Device;

  // Marks the packed ring's used descriptors published since the last call (publish_and_notify).
  void log_packed_used() noexcept VHOSTKIT_REQUIRES(worker_role_);

  std::uint16_t index_ = 0;
  std::uint32_t num = 0;                     // SET_VRING_NUM
  std::atomic<std::uint32_t> size_seen_{0};  // num, for ring_size() on any thread
  // SET_VRING_BASE: split, last_avail_idx to resume from; packed, a PackedRingBase encoded
  // (avail and used positions with their wrap counters).
  std::uint32_t base = 0;
  bool has_addr = false;
  memory::VringAddr addr;
  // The translation of addr and num into the device's table, made when the last of the three
  // arrives and again whenever one changes; why it failed otherwise. Control thread only.
  Result<MappedRing> mapped = unmapped();
  UniqueFd kick;
  bool kick_set = false;  // a kick fd, or "no fd" (polling) was given
  bool enabled = false;
  std::atomic<bool> started_{false};
  std::atomic<bool> broken_{false};

  // The worker that serves this queue, as a capability: the state below is touched only as
  // that worker (on its thread, in a run_sync work item, or with the worker parked or the
  // ring stopped). The control thread hands a ring over through started_ and run_sync.
  ThreadRole worker_role_;
  UniqueFd call VHOSTKIT_GUARDED_BY(worker_role_);  // signalled by the worker, swapped there
  UniqueFd err VHOSTKIT_GUARDED_BY(worker_role_);
  // The "ring broken" log line is written once per ring.
  bool broken_logged VHOSTKIT_GUARDED_BY(worker_role_) = false;
  // We kicked ourselves (rekick(): out of budget, or a device's chains left waiting).
  bool rekick_pending VHOSTKIT_GUARDED_BY(worker_role_) = false;
  std::uint64_t watch_id VHOSTKIT_GUARDED_BY(worker_role_) = 0;
  std::uint64_t poller_id VHOSTKIT_GUARDED_BY(worker_role_) = 0;
  // Sum of vq_.errors() already added to stats_.errors.
  std::uint64_t errors_seen VHOSTKIT_GUARDED_BY(worker_role_) = 0;
  // The used ring's dirty-log hook (VHOST_VRING_F_LOG). The table carries a log only while
  // LOG_ALL is acked.
  const memory::GuestMemory* mem VHOSTKIT_GUARDED_BY(worker_role_) = nullptr;
  std::uint64_t used_log_gpa VHOSTKIT_GUARDED_BY(worker_role_) = 0;
  bool log_used VHOSTKIT_GUARDED_BY(worker_role_) = false;
  // Packed: the descriptor ring and the device event area's guest addresses, and the used
  // position up to which the used descriptors were marked.
  std::uint64_t desc_log_gpa VHOSTKIT_GUARDED_BY(worker_role_) = 0;
  std::uint64_t device_event_log_gpa VHOSTKIT_GUARDED_BY(worker_role_) = 0;
  std::uint16_t logged_used_pos VHOSTKIT_GUARDED_BY(worker_role_) = 0;
  bool packed_ VHOSTKIT_GUARDED_BY(worker_role_) = false;
  virtq::DeviceQueue vq_ VHOSTKIT_GUARDED_BY(worker_role_);
  virtq::PackedDeviceQueue pvq_ VHOSTKIT_GUARDED_BY(worker_role_);
  InflightSplitQueue* inflight_ VHOSTKIT_GUARDED_BY(worker_role_) = nullptr;
  std::vector<std::uint16_t> resubmit_ VHOSTKIT_GUARDED_BY(worker_role_);
  QueueStats stats_;

  // At start, after the ring is attached: recovers what `iq` (the ring's part of the inflight
  // region, or nullptr) says is still in flight against the ring's used index, keeps the heads
  // to resubmit, and returns where popping resumes (the used index plus those heads).
  Result<std::uint16_t> start_inflight(InflightSplitQueue* iq) VHOSTKIT_REQUIRES(worker_role_);

  static Result<MappedRing> unmapped() {
    return fail(Errc::bad_state, "the vring has no size, addresses or memory yet");
  }
};

}  // namespace vhostkit::vhost
