// vhost::Device: the vhost_dev analogue. One method per vhost operation (the kernel's ioctls,
// vhost-user's requests), each validating its arguments and returning Result. vhost-user is a
// transport that decodes into exactly these calls.
//
// Rings start when they have memory, a size, addresses and a kick fd (or "no fd" for polling)
// and are enabled; they stop on get_vring_base, reset or a broken protocol. Ring work runs on
// the device's worker threads; the calls here are the control path and run on the caller's
// (session's) thread, handing work to the workers with run_sync.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "vhostkit/error.h"
#include "vhostkit/memory/guest_memory.h"
#include "vhostkit/unique_fd.h"
#include "vhostkit/vhost/backend.h"
#include "vhostkit/vhost/inflight.h"
#include "vhostkit/vhost/queue.h"
#include "vhostkit/vhost/worker.h"

namespace vhostkit::vhost {

struct DeviceOptions {
  std::string name = "dev";
  PollMode mode = PollMode::event;
  std::vector<int> cpus;                // one worker per entry (pinned); empty: see below
  std::uint16_t unpinned_workers = 1;   // workers (not pinned) when cpus is empty; >= 1
  std::uint16_t queues_per_worker = 2;  // queue i runs on worker (i / queues_per_worker) % N
  std::uint32_t adaptive_spin_us = 100;
};

class Device {
 public:
  static constexpr std::uint32_t kMaxQueueSize = 32768;

  Device(DeviceBackend& backend, DeviceOptions opts);
  ~Device();  // resets: stops rings, joins workers, unmaps, closes fds
  Device(const Device&) = delete;
  Device& operator=(const Device&) = delete;

  Result<> set_owner();
  Result<> reset_owner();  // back to the state before set_owner: rings stopped, memory gone
  bool has_owner() const noexcept;  // any thread, like features()
  // The owner check and its words ("SET_CONFIG before SET_OWNER"), for a transport's requests
  // that need an owner but no call here; every method here that needs one checks it itself.
  Result<> check_owner(std::string_view request) const;

  std::uint64_t offered_features() const noexcept;
  // Must be a subset of offered_features(). While rings run only LOG_ALL may change (migration).
  Result<> set_features(std::uint64_t features);
  // The features acked (0 before SET_FEATURES and after a reset). Any thread (a relaxed copy).
  std::uint64_t features() const noexcept;
  // Extra transport bits a session offers on top of the backend's (e.g. PROTOCOL_FEATURES).
  void add_offered_features(std::uint64_t bits) noexcept;

  Result<> set_mem_table(std::vector<memory::RegionFd> regions);
  Result<> add_mem_region(memory::RegionFd region);
  Result<> remove_mem_region(const memory::RegionSpec& spec);
  const memory::GuestMemory& memory() const noexcept;

  std::uint16_t num_queues() const noexcept;
  // Every ring runs the layout the acked features say (VIRTIO_F_RING_PACKED: packed, else
  // split). Sizes: a power of two in 1..32768 for split, any of 1..32768 for packed, checked
  // against the features acked when the size arrives and again when the ring is translated.
  Result<> set_vring_num(std::uint32_t index, std::uint32_t num);
  // Split: the three parts. Packed: desc is the descriptor ring, avail the driver event
  // suppression area, used the device's (as vhost-user carries them).
  Result<> set_vring_addr(std::uint32_t index, const memory::VringAddr& addr);
  // Split: last_avail_idx (16 bits). Packed: virtq::PackedRingBase's encoding (avail and used
  // positions with their wrap counters); a used half of zero with an avail half it cannot go
  // with means "used at avail" (front-ends that send 16 bits).
  Result<> set_vring_base(std::uint32_t index, std::uint32_t base);
  // Stops the ring and returns where the driver should resume (split: last_avail_idx; packed:
  // PackedRingBase encoded). The kick fd is closed: the ring starts again only after a new
  // set_vring_kick (vhost-user semantics), from that base unless SET_VRING_BASE changes it.
  Result<std::uint32_t> get_vring_base(std::uint32_t index);
  // An invalid fd means "no fd": the ring is polled (busy mode) instead of kicked.
  Result<> set_vring_kick(std::uint32_t index, UniqueFd fd);
  Result<> set_vring_call(std::uint32_t index, UniqueFd fd);
  Result<> set_vring_err(std::uint32_t index, UniqueFd fd);
  Result<> set_vring_enable(std::uint32_t index, bool enable);
  Result<> set_log_base(UniqueFd fd, std::uint64_t size, std::uint64_t offset);
  // Inflight I/O tracking (vhost-user GET_INFLIGHT_FD, SET_INFLIGHT_FD): the region where rings
  // record the requests they took and have not answered. It outlives ring restarts; each ring
  // that starts while the device has one recovers what a previous back-end left in flight
  // there (Queue::start_inflight). Replaced by the next call, dropped by nullptr and reset().
  // Only while every ring is stopped (no worker writes the region); `request` names the caller.
  Result<> set_inflight(std::string_view request, std::unique_ptr<InflightRegion> region);
  const InflightRegion* inflight() const noexcept;

  // Everything back to a fresh device: rings stopped, memory unmapped, every fd closed.
  void reset() noexcept;

  // A ring broke the protocol (e.g. avail idx runaway): the device stops serving it and says so.
  bool broken() const noexcept;
  Queue& queue(std::uint32_t index);  // index < num_queues()
  DeviceBackend& backend() noexcept;
  Worker& worker_for(std::uint32_t index);
  std::size_t worker_count() const noexcept;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace vhostkit::vhost
