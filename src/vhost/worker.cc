// The vhost worker thread: an epoll set of watched fds, a list of busy pollers and a work list.
#include "vhostkit/vhost/worker.h"

#include <pthread.h>
#include <sched.h>
#include <spdlog/spdlog.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cassert>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "vhostkit/thread_annotations.h"
#include "vhostkit/unique_fd.h"

namespace vhostkit::vhost {

std::string_view to_string(PollMode m) noexcept {
  switch (m) {
    case PollMode::event: return "event";
    case PollMode::busy: return "busy";
    case PollMode::adaptive: return "adaptive";
  }
  return "unknown";
}

std::optional<PollMode> parse_poll_mode(std::string_view s) noexcept {
  if (s == "event") return PollMode::event;
  if (s == "busy") return PollMode::busy;
  if (s == "adaptive") return PollMode::adaptive;
  return std::nullopt;
}

namespace {

// epoll data value of the worker's own wake eventfd; watch ids start at 1.
constexpr std::uint64_t kWakeId = 0;
// Busy/adaptive: polls between two non-sleeping epoll_wait calls (port fds, control work).
constexpr int kSpinBatch = 64;
constexpr int kMaxEvents = 32;

}  // namespace

struct Worker::Impl {
  struct Watch {
    int fd = -1;
    FdHandler handler;
    bool dead = false;
  };
  struct PollerEntry {
    Id id = 0;
    Poller p;
    bool dead = false;
  };

  explicit Impl(Options o) : opts(std::move(o)) {}

  Options opts;
  std::thread thread;
  std::atomic<std::thread::id> worker_id{};
  std::atomic<bool> stop_requested{false};
  std::atomic<bool> is_running{false};
  std::atomic<std::uint64_t> wakeups{0};
  UniqueFd epoll;
  UniqueFd wake;

  // The worker thread, as a capability: what follows is touched only as the worker (on its
  // thread, or by the control thread once that thread is joined).
  ThreadRole role;
  bool epoll_failed VHOSTKIT_GUARDED_BY(role) = false;  // the one epoll_wait error report
  std::unordered_map<Id, Watch> watches VHOSTKIT_GUARDED_BY(role);  // stable across inserts
  std::vector<Id> dead_watches VHOSTKIT_GUARDED_BY(role);  // erased after the current dispatch
  std::vector<PollerEntry> pollers VHOSTKIT_GUARDED_BY(role);
  // Merged at the top of the loop, never mid-iteration.
  std::vector<PollerEntry> new_pollers VHOSTKIT_GUARDED_BY(role);
  bool pollers_dirty VHOSTKIT_GUARDED_BY(role) = false;
  Id next_id VHOSTKIT_GUARDED_BY(role) = 1;

  // Work list (vhost_work_queue). `accepting` is false while no thread will run the list; then
  // queue_work runs items inline.
  Mutex work_mu;
  std::deque<std::function<void()>> work VHOSTKIT_GUARDED_BY(work_mu);
  bool accepting VHOSTKIT_GUARDED_BY(work_mu) = false;

  // The public calls that only the worker may make (watch, add_poller, ...): checked at run
  // time in debug builds, stated to the analysis here.
  void as_worker(const Worker& self) const VHOSTKIT_ASSERT_CAPABILITY(role) {
    assert(self.on_worker_thread() || !self.running());
    (void)self;
  }

  void wake_up() noexcept {
    const std::uint64_t one = 1;
    [[maybe_unused]] auto n = ::write(wake.get(), &one, sizeof one);
  }

  void run_work() VHOSTKIT_REQUIRES(role) {
    std::deque<std::function<void()>> batch;
    {
      MutexLock lk(work_mu);
      batch.swap(work);
    }
    for (auto& fn : batch) fn();
  }

  void reap() VHOSTKIT_REQUIRES(role) {
    for (Id id : dead_watches) watches.erase(id);
    dead_watches.clear();
    if (pollers_dirty) {
      std::erase_if(pollers, [](const PollerEntry& e) { return e.dead; });
      pollers_dirty = false;
    }
    if (!new_pollers.empty()) {
      for (auto& e : new_pollers) {
        if (!e.dead) pollers.push_back(std::move(e));
      }
      new_pollers.clear();
    }
  }

  // One epoll_wait plus dispatch. Returns true if any fd or work item was handled.
  bool wait(int timeout_ms) VHOSTKIT_REQUIRES(role) {
    epoll_event evs[kMaxEvents];
    int n = ::epoll_wait(epoll.get(), evs, kMaxEvents, timeout_ms);
    if (n < 0 && errno != EINTR) {
      // The epoll set is the worker's own, so this is a bug (EBADF, EFAULT, EINVAL), not a
      // peer's doing. Say so once, and back off: returning at once would turn every sleep of
      // the loop into a spin at 100% of a core.
      if (!epoll_failed) {
        epoll_failed = true;
        spdlog::error("vhost worker {}: epoll_wait failed ({}); fds are no longer served",
                      opts.name, std::strerror(errno));
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
      return false;
    }
    if (n <= 0) return false;  // timeout, or EINTR: the loop comes round again
    if (timeout_ms != 0) wakeups.fetch_add(1, std::memory_order_relaxed);
    bool have_work = false;
    for (int i = 0; i < n; ++i) {
      const Id id = evs[i].data.u64;
      if (id == kWakeId) {
        std::uint64_t v;
        [[maybe_unused]] auto r = ::read(wake.get(), &v, sizeof v);
        have_work = true;
        continue;
      }
      auto it = watches.find(id);
      // An earlier handler in this batch may have unwatched it.
      if (it == watches.end() || it->second.dead) continue;
      it->second.handler();
    }
    if (have_work) run_work();
    reap();
    return true;
  }

  bool poll_all() VHOSTKIT_REQUIRES(role) {
    bool any = false;
    // Indexing, not iterators: a poller may remove itself (marked dead, erased in reap()).
    for (std::size_t i = 0; i < pollers.size(); ++i) {
      if (pollers[i].dead) continue;
      if (pollers[i].p.poll && pollers[i].p.poll()) any = true;
    }
    return any;
  }

  // Whether a poller waits on I/O in flight (its completion fd watched): see Poller::io_wait.
  bool io_waiting() VHOSTKIT_REQUIRES(role) {
    for (std::size_t i = 0; i < pollers.size(); ++i) {
      if (!pollers[i].dead && pollers[i].p.io_wait && pollers[i].p.io_wait()) return true;
    }
    return false;
  }

  // Asks every poller to notify again before we sleep; true if one says work arrived meanwhile.
  bool arm_all(bool enable) VHOSTKIT_REQUIRES(role) {
    bool arrived = false;
    for (std::size_t i = 0; i < pollers.size(); ++i) {
      if (pollers[i].dead || !pollers[i].p.arm) continue;
      if (pollers[i].p.arm(enable)) arrived = true;
    }
    return arrived;
  }

  void loop() VHOSTKIT_REQUIRES(role) {
    worker_id.store(std::this_thread::get_id());
    std::string name = "vk-" + opts.name;
    if (name.size() > 15) name.resize(15);
    ::pthread_setname_np(::pthread_self(), name.c_str());

    using clock = std::chrono::steady_clock;
    const auto spin = std::chrono::microseconds(opts.adaptive_spin_us);
    auto last_work = clock::now();
    while (!stop_requested.load(std::memory_order_relaxed)) {
      reap();
      if (pollers.empty()) {
        // Nothing to spin on in any mode: sleep until an fd or control work arrives.
        wait(-1);
        last_work = clock::now();
        continue;
      }
      // Event mode with pollers (a ring without a kick fd) spins like busy mode: there is no
      // notification to sleep on.
      bool any = false;
      bool sleep_on_io = false;
      for (int i = 0; i < kSpinBatch && !stop_requested.load(std::memory_order_relaxed); ++i) {
        if (poll_all()) {
          any = true;
        } else if (io_waiting()) {
          if (opts.mode == PollMode::adaptive) {
            sleep_on_io = true;  // nothing but I/O in flight: go and sleep on it (below)
            break;
          }
          // A spinner waiting on I/O yields: whatever io_uring cannot finish at submission runs
          // in a kernel worker thread (iou-wrk) that may share this core, and would otherwise
          // wait for the scheduler to preempt us (milliseconds).
          ::sched_yield();
        }
      }
      // About to sleep on the I/O (nothing found this batch): the wait(-1) below serves whatever
      // is ready, so a wait(0) first would only cost a system call. A batch that found work
      // still looks at the fds, or control work could starve under a steady load.
      if ((any || !sleep_on_io) && wait(0)) any = true;
      if (opts.mode != PollMode::adaptive) continue;
      const auto now = clock::now();
      if (any) {
        last_work = now;
        continue;
      }
      // Waiting on the disk is idle too: spinning would only delay its interrupt, which an idle
      // CPU takes sooner (vhostkit-blk on a virtio disk here, QD1: issue to completion 52 us
      // under a spinning worker, 30-35 with it asleep; adaptive then did 1.08x the IOPS at QD1
      // and 1.13x at QD32 of what it did spinning out its budget).
      if (now - last_work < spin && !io_waiting()) continue;
      // Idle for the whole budget: re-enable notifications, re-check (work may have slipped in
      // before the driver saw the flag), and sleep only if nothing did.
      if (!arm_all(true)) wait(-1);
      arm_all(false);
      last_work = clock::now();
    }

    // Nothing queued from now on will find this thread: later items run inline in the caller.
    std::deque<std::function<void()>> rest;
    {
      MutexLock lk(work_mu);
      accepting = false;
      rest.swap(work);
    }
    for (auto& fn : rest) fn();
    worker_id.store(std::thread::id{});
  }
};

Worker::Worker(Options opts) : impl_(std::make_unique<Impl>(std::move(opts))) {}

Worker::~Worker() { stop(); }

Result<> Worker::start() {
  Impl& s = *impl_;
  if (s.is_running.load())
    return fail(Errc::bad_state, "worker vk-" + s.opts.name + " already running");
  s.epoll.reset(::epoll_create1(EPOLL_CLOEXEC));
  if (!s.epoll) return fail_errno("epoll_create1 for worker " + s.opts.name);
  s.wake.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!s.wake) {
    auto e = fail_errno("eventfd for worker " + s.opts.name);
    s.epoll.reset();
    return e;
  }
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = kWakeId;
  if (::epoll_ctl(s.epoll.get(), EPOLL_CTL_ADD, s.wake.get(), &ev) != 0) {
    auto e = fail_errno("epoll_ctl(wake) for worker " + s.opts.name);
    s.wake.reset();
    s.epoll.reset();
    return e;
  }
  s.stop_requested.store(false);
  {
    MutexLock lk(s.work_mu);
    s.accepting = true;
  }
  s.thread = std::thread([&s] {
    ScopedRole as_worker(s.role);
    s.loop();
  });
  s.is_running.store(true);
  if (s.opts.cpu) {
    const int cpu = *s.opts.cpu;
    int rc = EINVAL;
    if (cpu >= 0 && cpu < CPU_SETSIZE) {
      cpu_set_t set;
      CPU_ZERO(&set);
      CPU_SET(cpu, &set);
      rc = ::pthread_setaffinity_np(s.thread.native_handle(), sizeof set, &set);
    }
    if (rc != 0) {
      stop();
      return fail(Errc::system,
                  "cannot pin worker vk-" + s.opts.name + " to cpu " + std::to_string(cpu), rc);
    }
  }
  return {};
}

void Worker::stop() noexcept {
  Impl& s = *impl_;
  if (!s.is_running.load()) return;
  assert(!on_worker_thread() && "a worker cannot join itself");
  s.stop_requested.store(true);
  s.wake_up();
  s.thread.join();
  s.is_running.store(false);
  ScopedRole as_worker(s.role);  // the worker thread is gone: this one plays it now
  // Handlers belong to the run that is over; the fds they watched are their owners' to close.
  s.watches.clear();
  s.dead_watches.clear();
  s.pollers.clear();
  s.new_pollers.clear();
  s.wake.reset();
  s.epoll.reset();
}

bool Worker::running() const noexcept { return impl_->is_running.load(); }

const Worker::Options& Worker::options() const noexcept { return impl_->opts; }

Result<Worker::Id> Worker::watch(int fd, FdHandler on_ready) {
  Impl& s = *impl_;
  s.as_worker(*this);
  if (!s.epoll) return fail(Errc::bad_state, "worker vk-" + s.opts.name + " is not running");
  const Id id = s.next_id++;
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = id;
  if (::epoll_ctl(s.epoll.get(), EPOLL_CTL_ADD, fd, &ev) != 0) {
    return fail_errno("cannot watch fd " + std::to_string(fd) + " on worker vk-" + s.opts.name);
  }
  s.watches.emplace(id, Impl::Watch{fd, std::move(on_ready), false});
  return id;
}

void Worker::unwatch(Id id) noexcept {
  Impl& s = *impl_;
  s.as_worker(*this);
  auto it = s.watches.find(id);
  if (it == s.watches.end() || it->second.dead) return;
  if (s.epoll) ::epoll_ctl(s.epoll.get(), EPOLL_CTL_DEL, it->second.fd, nullptr);
  // The handler may be the one running now: erase it only after the dispatch.
  it->second.dead = true;
  s.dead_watches.push_back(id);
}

Worker::Id Worker::add_poller(Poller p) {
  Impl& s = *impl_;
  s.as_worker(*this);
  const Id id = s.next_id++;
  s.new_pollers.push_back(Impl::PollerEntry{id, std::move(p), false});
  return id;
}

void Worker::remove_poller(Id id) noexcept {
  Impl& s = *impl_;
  s.as_worker(*this);
  for (auto* list : {&s.pollers, &s.new_pollers}) {
    for (auto& e : *list) {
      if (e.id == id && !e.dead) {
        e.dead = true;
        s.pollers_dirty = true;
      }
    }
  }
}

void Worker::queue_work(std::function<void()> fn) {
  Impl& s = *impl_;
  {
    MutexLock lk(s.work_mu);
    if (s.accepting) {
      s.work.push_back(std::move(fn));
      s.wake_up();
      return;
    }
  }
  fn();
}

void Worker::run_sync(const std::function<void()>& fn) {
  Impl& s = *impl_;
  if (on_worker_thread()) {
    fn();
    return;
  }
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  bool queued = false;
  {
    MutexLock lk(s.work_mu);
    if (s.accepting) {
      s.work.push_back([&] {
        fn();
        std::lock_guard l(mu);
        done = true;
        cv.notify_one();
      });
      s.wake_up();
      queued = true;
    }
  }
  if (!queued) {
    fn();  // no worker thread: the caller is the only one touching the worker's state
    return;
  }
  std::unique_lock lk(mu);
  cv.wait(lk, [&] { return done; });
}

void Worker::flush() {
  run_sync([] {});
}

bool Worker::on_worker_thread() const noexcept {
  return impl_->worker_id.load() == std::this_thread::get_id();
}

std::uint64_t Worker::wakeups() const noexcept {
  return impl_->wakeups.load(std::memory_order_relaxed);
}

}  // namespace vhostkit::vhost
