// vhost::Queue: used-ring publication and the call eventfd.
#include "vhostkit/vhost/queue.h"

#include <unistd.h>

#include "vhostkit/virtio/ring.h"

namespace vhostkit::vhost {

void Queue::publish_and_notify() noexcept {
  vq_.publish_used();
  // Migration: the used ring was written; mark it dirty so the destination sees the update.
  // Coarse (the whole ring) on purpose: over-marking is safe, and this runs once per batch.
  if (log_used && mem != nullptr && mem->dirty_log() != nullptr) {
    mem->log_write(used_log_gpa, virtio::used_ring_bytes(num));
  }
  if (vq_.needs_notify()) signal();
}

void Queue::signal() noexcept {
  if (!call) return;
  const std::uint64_t one = 1;
  // The fd is non-blocking (set by Device): a peer that never reads cannot stall the worker.
  if (::write(call.get(), &one, sizeof one) == static_cast<ssize_t>(sizeof one)) {
    stats_.add(stats_.calls);
  }
}

}  // namespace vhostkit::vhost
