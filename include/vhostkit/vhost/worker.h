// The vhost worker: the userspace analogue of the kernel's vhost-$pid thread. One thread with an
// epoll set of watched fds (kick eventfds, port fds) and a work list for control work
// (vhost_work / vhost_work_flush), so the data path never takes a lock the control path holds
// for long.
//
// Polling modes:
//   event     sleep in epoll_wait until a kick or port fd is ready
//   busy      spin over the pollers forever (kicks disabled by the device), epoll checked
//             without sleeping every so often for control work and port fds
//   adaptive  spin for a budget after the last work found, then re-enable notifications
//             (pollers' `arm` callbacks), re-check, and sleep
// In every mode a worker with no pollers sleeps in epoll_wait; a worker with pollers in event
// mode (a ring without a kick fd) spins like busy mode, as nothing would wake it.
// wakeups() counts returns from a sleeping epoll_wait that had events.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "vhostkit/error.h"

namespace vhostkit::vhost {

enum class PollMode : std::uint8_t { event, busy, adaptive };
std::string_view to_string(PollMode m) noexcept;
std::optional<PollMode> parse_poll_mode(std::string_view s) noexcept;

class Worker {
 public:
  struct Options {
    std::string name = "dev";  // thread name becomes "vk-<name>" (truncated to 15 chars)
    std::optional<int> cpu;    // pin to this CPU
    PollMode mode = PollMode::event;
    std::uint32_t adaptive_spin_us = 100;  // adaptive: spin this long after the last work
  };

  // Runs on the worker when fd is readable (or hung up). Must not block.
  using FdHandler = std::function<void()>;
  // A busy/adaptive poller: returns true if it found work. `arm(true)` asks the source to
  // notify again before the worker sleeps and returns true if work arrived meanwhile (the race
  // re-check); `arm(false)` turns notifications off while spinning. `io_wait` (optional): true
  // when the source has nothing to do but wait for I/O whose completion an fd of this worker
  // reports; an adaptive worker whose pollers are all idle, one of them waiting so, sleeps at
  // once rather than after its spin budget, and a busy one yields its core (sched_yield) each
  // such round, so that a kernel thread finishing the I/O on this core gets to run.
  struct Poller {
    std::function<bool()> poll;
    std::function<bool(bool enable)> arm;
    std::function<bool()> io_wait = {};
  };
  using Id = std::uint64_t;

  explicit Worker(Options opts);
  ~Worker();  // stops and joins
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  Result<> start();
  void stop() noexcept;
  bool running() const noexcept;
  const Options& options() const noexcept;

  // These three may be called only on the worker thread (from a handler or a work item);
  // from another thread wrap them in run_sync().
  Result<Id> watch(int fd, FdHandler on_ready);
  void unwatch(Id id) noexcept;
  Id add_poller(Poller p);
  void remove_poller(Id id) noexcept;

  // Queues control work to run on the worker thread (vhost_work_queue).
  void queue_work(std::function<void()> fn);
  // Runs fn on the worker and waits for it (vhost_work_queue + vhost_work_flush). Runs fn
  // inline when called on the worker thread or when the worker is not running.
  void run_sync(const std::function<void()>& fn);
  // Waits until every work item queued before this call has run.
  void flush();

  bool on_worker_thread() const noexcept;
  // Wake-ups from epoll_wait (for the idle-CPU measurements and tests).
  std::uint64_t wakeups() const noexcept;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace vhostkit::vhost
