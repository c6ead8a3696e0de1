// vhost::Queue: used-ring publication and the call eventfd.
#include "vhostkit/vhost/queue.h"

#include <unistd.h>

#include "vhostkit/virtio/ring.h"

namespace vhostkit::vhost {

void Queue::publish_and_notify() noexcept {
  worker_role_.assume();  // the device's handlers call this on the worker
  vq_.publish_used();
  // Migration: the used ring was written; mark it dirty so the destination sees the update.
  // Coarse (the whole ring) on purpose: over-marking is safe, and this runs once per batch.
  if (log_used && mem != nullptr && mem->dirty_log() != nullptr) {
    mem->log_write(used_log_gpa, virtio::used_ring_bytes(num));
  }
  if (vq_.needs_notify()) signal();
}

void Queue::reset() noexcept {
  worker_role_.assume();  // a stopped ring: no worker touches it any more
  kick.reset();
  call.reset();
  err.reset();
  num = 0;
  base = 0;
  has_addr = false;
  addr = memory::VringAddr{};
  mapped = unmapped();
  kick_set = false;
  enabled = false;
  started_.store(false, std::memory_order_release);
  broken_.store(false, std::memory_order_release);
  broken_logged = false;
  rekick_pending = false;
  watch_id = 0;
  poller_id = 0;
  errors_seen = 0;
  mem = nullptr;
  used_log_gpa = 0;
  log_used = false;
  vq_ = virtq::DeviceQueue{};
  stats_.clear();
}

void Queue::signal() noexcept {
  worker_role_.assume();  // the worker, or a test with the ring quiet
  if (!call) return;
  const std::uint64_t one = 1;
  // The fd is non-blocking (set by Device): a peer that never reads cannot stall the worker.
  if (::write(call.get(), &one, sizeof one) == static_cast<ssize_t>(sizeof one)) {
    stats_.add(stats_.calls);
  }
}

}  // namespace vhostkit::vhost
