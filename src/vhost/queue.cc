// vhost::Queue: used-ring publication and the call eventfd.
#include "vhostkit/vhost/queue.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include "vhostkit/virtio/ring.h"

namespace vhostkit::vhost {

void Queue::log_packed_used() noexcept {
  // The used descriptors published since the last call overwrote available ones in the
  // descriptor ring: mark the slots from the last logged position to the used position (a
  // whole lap when they meet, which over-marks a batch that wrote nothing: safe). QEMU gives
  // the device event area as the ring's log address for packed rings (its used_phys), which
  // covers none of them; the descriptor ring's own guest address does. The device event area
  // (written by enable/disable_notifications) is marked too.
  const std::uint16_t size = pvq_.size();
  const std::uint16_t to = pvq_.base().used_idx;
  const std::uint16_t from = logged_used_pos;
  constexpr std::size_t kDesc = sizeof(virtio::PackedDesc);
  if (from < to) {
    mem->log_write(desc_log_gpa + from * kDesc, static_cast<std::size_t>(to - from) * kDesc);
  } else {
    mem->log_write(desc_log_gpa + from * kDesc, static_cast<std::size_t>(size - from) * kDesc);
    if (to != 0) mem->log_write(desc_log_gpa, std::size_t{to} * kDesc);
  }
  logged_used_pos = to;
  mem->log_write(device_event_log_gpa, sizeof(virtio::PackedEventSuppress));
}

void Queue::publish_and_notify() noexcept {
  worker_role_.assume();  // the device's handlers call this on the worker
  if (packed_) {
    pvq_.publish_used();
    if (log_used && mem != nullptr && mem->dirty_log() != nullptr) log_packed_used();
    if (pvq_.needs_notify()) signal();
    return;
  }
  vq_.publish_used();
  // Inflight I/O: the used idx is in the ring before the published requests lose their marks,
  // so a back-end killed in between leaves marks that recovery clears, not holes.
  if (inflight_ != nullptr) inflight_->published(vq_.used_idx());
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
  size_seen_.store(0, std::memory_order_relaxed);
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
  desc_log_gpa = 0;
  device_event_log_gpa = 0;
  logged_used_pos = 0;
  packed_ = false;
  vq_ = virtq::DeviceQueue{};
  pvq_ = virtq::PackedDeviceQueue{};
  inflight_ = nullptr;
  resubmit_.clear();
  stats_.clear();
}

Result<std::uint16_t> Queue::start_inflight(InflightSplitQueue* iq) {
  inflight_ = nullptr;
  resubmit_.clear();
  if (iq == nullptr || vq_.broken()) return vq_.last_avail_idx();
  // A front-end that lost its back-end sets the base to the used index (QEMU reads it from the
  // ring); every head taken since is either answered in the used ring or in flight in the
  // region, so popping resumes past the ones in flight, which are resubmitted first.
  auto rec = iq->recover(vq_.used_idx(), num);
  if (!rec) {
    return fail(rec.error().code, fmt::format("vring {}: {}", index_, rec.error().detail));
  }
  if (!rec->resubmit.empty() || rec->batch_cleared != 0) {
    spdlog::info(
        "vring {}: {} request(s) left in flight by the previous back-end are resubmitted"
        " ({} answered ones cleared); resuming at avail index {}",
        index_, rec->resubmit.size(), rec->batch_cleared, rec->last_avail_idx);
  }
  inflight_ = iq;
  resubmit_ = std::move(rec->resubmit);
  return rec->last_avail_idx;
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

void Queue::rekick() noexcept {
  worker_role_.assume();  // the device's handlers and hooks, and Device's own loop, run there
  // The kick fd changes only with the ring stopped (Device::set_vring_kick stops it first, on
  // the worker), so it is stable while the caller, on the worker, sees the ring running.
  if (!kick || !started()) return;
  // Our own kick: on_kick does not count it among the driver's.
  rekick_pending = true;
  const std::uint64_t one = 1;
  [[maybe_unused]] auto n = ::write(kick.get(), &one, sizeof one);
}

}  // namespace vhostkit::vhost
