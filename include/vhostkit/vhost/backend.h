// What a device type (virtio-net, virtio-blk, a test device) implements to sit on vhost::Device.
#pragma once

#include <cstdint>
#include <span>

#include "vhostkit/error.h"

namespace vhostkit::vhost {

class Queue;
class Worker;

class DeviceBackend {
 public:
  virtual ~DeviceBackend() = default;

  // Device-specific and transport feature bits this device offers (VERSION_1, EVENT_IDX, ...).
  // Device adds nothing on its own; the vhost-user session adds PROTOCOL_FEATURES/LOG_ALL.
  virtual std::uint64_t features() const noexcept = 0;
  // Number of virtqueues this device has (net: 2 per pair + ctrl; blk: num_queues).
  virtual std::uint16_t num_queues() const noexcept = 0;
  // The device records its requests in flight (Queue::inflight) and resubmits what a previous
  // back-end left there (Queue::take_resubmit), so the vhost-user session offers
  // INFLIGHT_SHMFD. For devices whose requests must not be lost or repeated across a restart
  // (blk); a network device drops and repeats frames anyway.
  virtual bool tracks_inflight() const noexcept { return false; }

  // Config space (GET_CONFIG / SET_CONFIG). Out-of-range or read-only writes are refused.
  virtual Result<> read_config(std::uint32_t offset, std::span<std::uint8_t> out) const {
    (void)offset;
    (void)out;
    return fail(Errc::unsupported, "device has no config space");
  }
  virtual Result<> write_config(std::uint32_t offset, std::span<const std::uint8_t> data) {
    (void)offset;
    (void)data;
    return fail(Errc::unsupported, "config space is read-only");
  }

  // The features the driver acked (after SET_FEATURES), before any ring starts.
  virtual void set_features(std::uint64_t acked) noexcept { (void)acked; }

  // Called on the queue's worker thread when a ring starts (kick registered) and before it
  // stops. A device binds port fds to the worker here.
  virtual void queue_started(Queue& q, Worker& w) {
    (void)q;
    (void)w;
  }
  virtual void queue_stopped(Queue& q, Worker& w) {
    (void)q;
    (void)w;
  }

  // Guest memory is about to be remapped (SET_MEM_TABLE, REM_MEM_REG) under a running ring.
  // Called while the queue's worker is parked (possibly from another thread). A device that
  // keeps requests in flight across handle_queue calls (blk's io_uring) must finish and answer
  // them here: once it returns, the buffers they point into may be unmapped.
  virtual void quiesce(Queue& q, Worker& w) {
    (void)q;
    (void)w;
  }

  // Called on the worker when the queue may have work (a kick, or a busy poll). Processes up
  // to a budget of chains and returns true if it did any work. Must publish used entries and
  // notify (Queue::publish_and_notify) before returning.
  virtual bool handle_queue(Queue& q) noexcept = 0;

  // Called on the worker after a handle_queue that found nothing to do: true when the queue
  // still has requests in flight in the kernel, whose completions wake the worker through an
  // fd it watches (blk's io_uring). An adaptive worker then sleeps at once instead of spinning
  // out its budget: the completion interrupt reaches an idle CPU sooner than a busy one.
  virtual bool waiting_on_io(const Queue& q) const noexcept {
    (void)q;
    return false;
  }
};

}  // namespace vhostkit::vhost
