// vhost::Worker: the work list, fd watches, pollers, modes, naming and pinning.
#include "vhostkit/vhost/worker.h"

#include <gtest/gtest.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
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

template <typename F>
bool eventually(F&& pred, std::chrono::milliseconds limit = 1000ms) {
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
  std::this_thread::sleep_for(20ms);
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
  std::this_thread::sleep_for(20ms);
  EXPECT_EQ(w.wakeups(), before) << "an idle event-mode worker must not wake";
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
  std::this_thread::sleep_for(10ms);
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
  std::this_thread::sleep_for(20ms);
  EXPECT_EQ(polls.load(), p) << "asleep after the spin budget, not polling";
  // Work wakes it: notifications off again, spinning again.
  w.run_sync([] {});
  ASSERT_TRUE(eventually([&] { return armed_off.load() >= 1; }));
  EXPECT_GT(polls.load(), p);
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

class StopPrompt : public ::testing::TestWithParam<PollMode> {};

TEST_P(StopPrompt, StopsWithin100ms) {
  Worker w(opts("stop", GetParam()));
  ASSERT_TRUE(w.start().has_value());
  w.run_sync([&] { w.add_poller({[] { return false; }, [](bool) { return false; }}); });
  std::this_thread::sleep_for(5ms);  // adaptive: past its spin, asleep
  const auto t0 = std::chrono::steady_clock::now();
  w.stop();
  const auto took = std::chrono::steady_clock::now() - t0;
  EXPECT_LT(took, 100ms);
  EXPECT_FALSE(w.running());
  // And it can run again.
  ASSERT_TRUE(w.start().has_value());
  bool ran = false;
  w.run_sync([&] { ran = w.on_worker_thread(); });
  EXPECT_TRUE(ran);
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
