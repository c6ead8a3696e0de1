// vhost::Worker: the work list, fd watches, pollers, modes, naming and pinning.
#include "vhostkit/vhost/worker.h"

#include <gtest/gtest.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <thread>
#include <vector>

#include "vhostkit/unique_fd.h"

namespace vhostkit::vhost {
namespace {

using namespace std::chrono_literals;

Worker::Options opts(std::string name, PollMode mode = PollMode::event) {
  Worker::Options o;
  o.name = std::move(name);
  o.mode = mode;
  o.adaptive_spin_us = 200;
  return o;
}

// Waits for an event the test caused. The limit is generous (a loaded 2-core host can leave a
// thread unscheduled for seconds); a passing test returns in milliseconds.
template <typename F>
bool eventually(F&& pred, std::chrono::milliseconds limit = 20s) {
  const auto end = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < end) {
    if (pred()) return true;
    std::this_thread::sleep_for(1ms);
  }
  return pred();
}

TEST(Worker, PollModeNames) {
  EXPECT_EQ(parse_poll_mode("busy"), PollMode::busy);
  EXPECT_EQ(parse_poll_mode(to_string(PollMode::adaptive)), PollMode::adaptive);
  EXPECT_EQ(parse_poll_mode("spin"), std::nullopt);
}

TEST(Worker, RunSyncSeesEarlierWorkInOrder) {
  Worker w(opts("order"));
  ASSERT_TRUE(w.start().has_value());
  std::vector<int> seen;  // touched only on the worker until run_sync returns
  for (int i = 0; i < 100; ++i) w.queue_work([&seen, i] { seen.push_back(i); });
  std::vector<int> copy;
  w.run_sync([&] {
    EXPECT_TRUE(w.on_worker_thread());
    copy = seen;
  });
  ASSERT_EQ(copy.size(), 100u);
  for (int i = 0; i < 100; ++i) EXPECT_EQ(copy[i], i);
  EXPECT_FALSE(w.on_worker_thread());
}

TEST(Worker, FlushWaitsForQueuedWork) {
  Worker w(opts("flush"));
  ASSERT_TRUE(w.start().has_value());
  std::atomic<int> done{0};
  for (int i = 0; i < 10; ++i) {
    w.queue_work([&] {
      std::this_thread::sleep_for(2ms);
      done.fetch_add(1);
    });
  }
  w.flush();
  EXPECT_EQ(done.load(), 10);
}

TEST(Worker, RunSyncInlineOnWorkerAndWhenStopped) {
  Worker w(opts("inline"));
  bool ran = false;
  w.run_sync([&] { ran = true; });  // not running: inline
  EXPECT_TRUE(ran);
  ASSERT_TRUE(w.start().has_value());
  int depth = 0;
  w.run_sync([&] {
    // Nested on the worker: inline, or it would wait for itself forever.
    w.run_sync([&] { depth = 2; });
  });
  EXPECT_EQ(depth, 2);
}

TEST(Worker, WatchRunsHandlerAndUnwatchFromHandler) {
  Worker w(opts("watch"));
  ASSERT_TRUE(w.start().has_value());
  UniqueFd efd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  std::atomic<int> fired{0};
  Worker::Id id = 0;
  w.run_sync([&] {
    auto r = w.watch(efd.get(), [&] {
      std::uint64_t v;
      [[maybe_unused]] auto n = ::read(efd.get(), &v, sizeof v);
      if (fired.fetch_add(1) == 1) w.unwatch(id);  // second time: stop watching itself
    });
    ASSERT_TRUE(r.has_value());
    id = *r;
  });
  const std::uint64_t one = 1;
  for (int i = 0; i < 3; ++i) {
    ASSERT_EQ(::write(efd.get(), &one, 8), 8);
    if (i < 2) {
      ASSERT_TRUE(eventually([&] { return fired.load() == i + 1; }));
    }
  }
  // The unwatched fd is now readable. Had it still been in the epoll set, it would have been
  // ready no later than flush()'s wake-up, and a batch runs its fd handlers before its work
  // items: once the flush is through, its handler would have run.
  w.flush();
  EXPECT_EQ(fired.load(), 2);
}

TEST(Worker, WatchRefusesBadFd) {
  Worker w(opts("badfd"));
  ASSERT_TRUE(w.start().has_value());
  w.run_sync([&] {
    auto r = w.watch(-1, [] {});
    ASSERT_FALSE(r.has_value());
    EXPECT_EQ(r.error().code, Errc::system);
  });
}

TEST(Worker, EventModeSleepsAndCountsWakeups) {
  Worker w(opts("wake"));
  ASSERT_TRUE(w.start().has_value());
  UniqueFd efd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  std::atomic<int> fired{0};
  w.run_sync([&] {
    ASSERT_TRUE(w.watch(efd.get(), [&] {
                   std::uint64_t v;
                   [[maybe_unused]] auto n = ::read(efd.get(), &v, sizeof v);
                   fired.fetch_add(1);
                 }).has_value());
  });
  const auto before = w.wakeups();
  // Only a negative to observe here: a short bounded wait for a wake-up that must not come.
  EXPECT_FALSE(eventually([&] { return w.wakeups() != before; }, 20ms))
      << "an idle event-mode worker must not wake";
  const std::uint64_t one = 1;
  ASSERT_EQ(::write(efd.get(), &one, 8), 8);
  ASSERT_TRUE(eventually([&] { return fired.load() == 1; }));
  EXPECT_EQ(w.wakeups(), before + 1);
}

TEST(Worker, BusyModeSpinsPollers) {
  Worker w(opts("busy", PollMode::busy));
  ASSERT_TRUE(w.start().has_value());
  std::atomic<std::uint64_t> polls{0};
  Worker::Id id = 0;
  w.run_sync([&] {
    id = w.add_poller({[&] {
                         polls.fetch_add(1, std::memory_order_relaxed);
                         return false;
                       },
                       nullptr});
  });
  ASSERT_TRUE(eventually([&] { return polls.load() > 10000; }));
  // Control work still gets through while spinning.
  bool ran = false;
  w.run_sync([&] { ran = true; });
  EXPECT_TRUE(ran);
  w.run_sync([&] { w.remove_poller(id); });
  const auto after = polls.load();
  // A marker through the same path: a second poller, added after the removal. Once it has been
  // called twice the worker has gone over its whole poller list at least once since.
  std::atomic<std::uint64_t> marker{0};
  w.run_sync([&] {
    w.add_poller({[&] {
                    marker.fetch_add(1, std::memory_order_relaxed);
                    return false;
                  },
                  nullptr});
  });
  ASSERT_TRUE(eventually([&] { return marker.load() >= 2; }));
  EXPECT_EQ(polls.load(), after) << "a removed poller is not called";
}

TEST(Worker, AdaptiveModeArmsAndSleepsWhenIdle) {
  Worker w(opts("adaptive", PollMode::adaptive));
  ASSERT_TRUE(w.start().has_value());
  std::atomic<std::uint64_t> polls{0};
  std::atomic<int> armed_on{0}, armed_off{0};
  std::atomic<bool> sleeping{false};
  w.run_sync([&] {
    w.add_poller({[&] {
                    polls.fetch_add(1, std::memory_order_relaxed);
                    return false;
                  },
                  [&](bool enable) {
                    (enable ? armed_on : armed_off).fetch_add(1);
                    sleeping = enable;
                    return false;
                  }});
  });
  ASSERT_TRUE(eventually([&] { return armed_on.load() >= 1 && sleeping.load(); }));
  const auto p = polls.load();
  // Asleep: nothing more to observe than polls that must not come, so a short bounded wait for
  // one (a spinning worker makes thousands in 20 ms).
  EXPECT_FALSE(eventually([&] { return polls.load() != p; }, 20ms))
      << "asleep after the spin budget, not polling";
  // Work wakes it: notifications off again, spinning again.
  w.run_sync([] {});
  ASSERT_TRUE(eventually([&] { return armed_off.load() >= 1; }));
  EXPECT_GT(polls.load(), p);
}

// A poller with nothing to do but I/O in flight (blk waiting on io_uring): the adaptive worker
// sleeps at once, not after its spin budget (an hour here), and keeps spinning while the
// source has no I/O out.
TEST(Worker, AdaptiveModeSleepsAtOnceWhileOnlyIoIsInFlight) {
  Worker::Options o = opts("adaptive-io", PollMode::adaptive);
  o.adaptive_spin_us = 3600u * 1000 * 1000;
  Worker w(o);
  ASSERT_TRUE(w.start().has_value());
  std::atomic<std::uint64_t> polls{0};
  std::atomic<int> armed_on{0};
  std::atomic<bool> io_out{false};
  w.run_sync([&] {
    w.add_poller({[&] {
                    polls.fetch_add(1, std::memory_order_relaxed);
                    return false;
                  },
                  [&](bool enable) {
                    if (enable) armed_on.fetch_add(1);
                    return false;
                  },
                  [&] { return io_out.load(); }});
  });
  // No I/O out: the budget holds, it spins.
  const auto p0 = polls.load();
  ASSERT_TRUE(eventually([&] { return polls.load() > p0 + 1000; }));
  EXPECT_EQ(armed_on.load(), 0) << "slept within its spin budget with no I/O out";
  io_out = true;
  ASSERT_TRUE(eventually([&] { return armed_on.load() >= 1; }))
      << "did not sleep while its only work was I/O in flight";
}

// A poller that finds work and then, the next round, only I/O in flight, over and over (a
// queue at a steady depth): the worker never sleeps, and it must still look at its fds and run
// control work between batches.
TEST(Worker, AdaptiveModeServesControlWorkWhileWorkAndIoWaitAlternate) {
  // Declared before the workers, which use them until they stop.
  std::atomic<std::uint64_t> polls{0}, asked{0};
  std::atomic<bool> ran{false}, ran_b{false};
  Worker::Options o = opts("adaptive-alt", PollMode::adaptive);
  o.adaptive_spin_us = 3600u * 1000 * 1000;
  Worker w(o);
  ASSERT_TRUE(w.start().has_value());
  w.run_sync([&] {
    w.add_poller({[&] { return polls.fetch_add(1, std::memory_order_relaxed) % 2 == 0; },
                  [](bool) { return false; }, [] { return true; }});
  });
  ASSERT_TRUE(eventually([&] { return polls.load() > 1000; }));
  w.queue_work([&] { ran = true; });
  EXPECT_TRUE(eventually([&] { return ran.load(); }))
      << "control work never ran while the poller alternated between work and I/O waits";
  // A busy-mode worker asks the same question on its idle rounds (it yields the core then).
  Worker b(opts("busy-io", PollMode::busy));
  ASSERT_TRUE(b.start().has_value());
  b.run_sync([&] {
    b.add_poller({[] { return false; }, [](bool) { return false; },
                  [&] {
                    asked.fetch_add(1, std::memory_order_relaxed);
                    return true;
                  }});
  });
  EXPECT_TRUE(eventually([&] { return asked.load() > 1000; }));
  b.queue_work([&] { ran_b = true; });
  EXPECT_TRUE(eventually([&] { return ran_b.load(); }));
}

TEST(Worker, AdaptiveModeKeepsSpinningWhenArmFindsWork) {
  Worker w(opts("adaptive2", PollMode::adaptive));
  ASSERT_TRUE(w.start().has_value());
  std::atomic<int> arms{0};
  std::atomic<std::uint64_t> polls{0};
  w.run_sync([&] {
    w.add_poller({[&] {
                    polls.fetch_add(1, std::memory_order_relaxed);
                    return false;
                  },
                  [&](bool enable) {
                    if (enable) arms.fetch_add(1);
                    return enable;  // "work arrived": never sleep
                  }});
  });
  ASSERT_TRUE(eventually([&] { return arms.load() >= 3; }));
  // Nothing else could wake it: polls that keep coming prove it never went to sleep.
  const auto p = polls.load();
  EXPECT_TRUE(eventually([&] { return polls.load() > p + 1000; }));
}

// Calls w.stop() on another thread and waits up to `limit` for it to return. A stop that never
// returns leaves a thread inside the worker that nothing can take back, so the test process
// ends here with the reason rather than hanging until ctest's timeout.
void stop_or_die(Worker& w, std::chrono::seconds limit) {
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  std::thread stopper([&] {
    w.stop();
    std::lock_guard lk(mu);
    done = true;
    cv.notify_one();
  });
  std::unique_lock lk(mu);
  if (!cv.wait_for(lk, limit, [&] { return done; })) {
    std::fprintf(stderr, "worker %s did not stop within %llds\n", w.options().name.c_str(),
                 static_cast<long long>(limit.count()));
    std::fflush(stderr);
    std::abort();
  }
  lk.unlock();
  stopper.join();
}

class StopPrompt : public ::testing::TestWithParam<PollMode> {};

// A worker with a poller stops in every mode: spinning (busy, event without a kick fd) and
// asleep after its spin budget (adaptive). Stopping is asserted, not how fast it is.
TEST_P(StopPrompt, StopsSpinningOrAsleep) {
  Worker w(opts("stop", GetParam()));
  ASSERT_TRUE(w.start().has_value());
  std::atomic<std::uint64_t> polls{0};
  std::atomic<bool> asleep{false};
  w.run_sync([&] {
    w.add_poller({[&] {
                    polls.fetch_add(1, std::memory_order_relaxed);
                    return false;
                  },
                  [&](bool enable) {
                    asleep = enable;
                    return false;
                  }});
  });
  if (GetParam() == PollMode::adaptive) {
    // Past its spin budget: notifications armed, and nothing arrived, so it sleeps.
    ASSERT_TRUE(eventually([&] { return asleep.load(); }));
  } else {
    ASSERT_TRUE(eventually([&] { return polls.load() > 0; })) << "spinning over its poller";
  }
  stop_or_die(w, 30s);
  EXPECT_FALSE(w.running());
  // And it can run again; with no poller now it sleeps in epoll_wait, and stops from there too.
  ASSERT_TRUE(w.start().has_value());
  bool ran = false;
  w.run_sync([&] { ran = w.on_worker_thread(); });
  EXPECT_TRUE(ran);
  stop_or_die(w, 30s);
  EXPECT_FALSE(w.running());
}

INSTANTIATE_TEST_SUITE_P(Modes, StopPrompt,
                         ::testing::Values(PollMode::event, PollMode::busy, PollMode::adaptive),
                         [](const auto& info) { return std::string(to_string(info.param)); });

TEST(Worker, ThreadNameVisibleInProc) {
  Worker w(opts("named"));
  ASSERT_TRUE(w.start().has_value());
  w.flush();  // the name is set before the first work item runs
  bool found = false;
  for (const auto& e : std::filesystem::directory_iterator("/proc/self/task")) {
    std::ifstream f(e.path() / "comm");
    std::string comm;
    std::getline(f, comm);
    if (comm == "vk-named") found = true;
  }
  EXPECT_TRUE(found);
}

TEST(Worker, LongNameTruncatedTo15) {
  Worker w(opts("a-very-long-device-name"));
  ASSERT_TRUE(w.start().has_value());
  std::string comm;
  w.run_sync([&] {
    std::ifstream f("/proc/thread-self/comm");
    std::getline(f, comm);
  });
  EXPECT_EQ(comm, "vk-a-very-long-");
}

TEST(Worker, PinnedToCpu0) {
  auto o = opts("pinned");
  o.cpu = 0;
  Worker w(o);
  ASSERT_TRUE(w.start().has_value());
  cpu_set_t set;
  CPU_ZERO(&set);
  int rc = -1;
  w.run_sync([&] { rc = ::sched_getaffinity(0, sizeof set, &set); });
  ASSERT_EQ(rc, 0);
  EXPECT_EQ(CPU_COUNT(&set), 1);
  EXPECT_TRUE(CPU_ISSET(0, &set));
}

TEST(Worker, PinningToMissingCpuIsAnError) {
  auto o = opts("nocpu");
  o.cpu = CPU_SETSIZE - 1;  // no such CPU here
  Worker w(o);
  auto r = w.start();
  ASSERT_FALSE(r.has_value());
  EXPECT_NE(r.error().detail.find("cpu"), std::string::npos);
  EXPECT_FALSE(w.running());
}

TEST(Worker, QueueWorkAfterStopRunsInline) {
  Worker w(opts("late"));
  ASSERT_TRUE(w.start().has_value());
  w.stop();
  bool ran = false;
  w.queue_work([&] { ran = true; });
  EXPECT_TRUE(ran);
}

}  // namespace
}  // namespace vhostkit::vhost
