// vhost::Device end to end in one process: the virtq driver on memfd memory, the Device mapping
// the same memfd, an echo backend, real eventfds.
#include "vhostkit/vhost/device.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <fstream>
#include <thread>

#include "testing/dirty_log.h"
#include "testing/fd_count.h"
#include "testing/vhost_rig.h"

namespace vhostkit::vhost {
namespace {

using testing::EchoBackend;
using testing::kEchoFeatures;
using testing::Rig;

// How long a test waits for an event it caused (a used entry, a call, the err eventfd). Generous:
// a loaded 2-core host can leave the worker unscheduled for seconds; a passing test takes ms.
constexpr int kWaitMs = 20000;

template <typename F>
bool eventually(F&& pred, std::chrono::milliseconds limit = std::chrono::milliseconds(kWaitMs)) {
  const auto end = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < end) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return pred();
}

DeviceOptions opts(PollMode mode, std::string name = "t") {
  DeviceOptions o;
  o.name = std::move(name);
  o.mode = mode;
  o.adaptive_spin_us = 200;
  return o;
}

void bring_up(Device& dev, Rig& rig) {
  ASSERT_TRUE(dev.set_owner().has_value());
  ASSERT_TRUE(dev.set_features(kEchoFeatures).has_value());
  auto m = dev.set_mem_table(rig.table());
  ASSERT_TRUE(m.has_value()) << m.error().message();
}

// Sends `count` requests on queue q one at a time and checks every echo.
void echo_round_trips(Rig& rig, std::uint16_t q, int count, int first_token = 0) {
  for (int i = first_token; i < first_token + count; ++i) {
    const std::string msg = "ping " + std::to_string(i);
    rig.post(q, msg, i);
    auto u = rig.wait_used(q, kWaitMs);
    ASSERT_TRUE(u.has_value()) << "no used element for request " << i;
    EXPECT_EQ(u->token, static_cast<std::uint64_t>(i));
    EXPECT_EQ(u->len, msg.size());
    EXPECT_EQ(rig.reply(q, i, msg.size()), msg);
  }
}

TEST(Device, EventModeEchoWithRealEventfds) {
  EchoBackend be;
  Device dev(be, opts(PollMode::event));
  Rig rig;
  bring_up(dev, rig);
  rig.configure(dev, 0);
  ASSERT_TRUE(dev.queue(0).started());
  EXPECT_EQ(be.started_calls.load(), 1);
  echo_round_trips(rig, 0, 50);
  const auto& st = dev.queue(0).stats();
  EXPECT_EQ(st.chains.load(), 50u);
  EXPECT_GT(st.kicks.load(), 0u);
  EXPECT_GT(st.calls.load(), 0u);
  EXPECT_EQ(st.errors.load(), 0u);
  EXPECT_FALSE(dev.broken());
}

TEST(Device, EventModeCallArrivesOnEventfd) {
  EchoBackend be;
  Device dev(be, opts(PollMode::event));
  Rig rig;
  bring_up(dev, rig);
  rig.configure(dev, 0);
  rig.post(0, "hello", 1);
  // The driver sleeps on the call eventfd, as a guest would on its interrupt.
  ASSERT_TRUE(testing::wait_fd(rig.call_fd(0), kWaitMs))
      << "kicks " << dev.queue(0).stats().kicks.load() << " calls "
      << dev.queue(0).stats().calls.load() << " chains " << dev.queue(0).stats().chains.load();
  auto u = rig.driver(0).get_used();
  ASSERT_TRUE(u.has_value());
  EXPECT_EQ(rig.reply(0, 1, 5), "hello");
}

TEST(Device, BusyModeWithoutKickFd) {
  EchoBackend be;
  Device dev(be, opts(PollMode::busy));
  Rig rig;
  bring_up(dev, rig);
  rig.configure(dev, 0, /*use_kick=*/false);
  ASSERT_TRUE(dev.queue(0).started());
  echo_round_trips(rig, 0, 50);
  EXPECT_EQ(dev.queue(0).stats().kicks.load(), 0u);
  EXPECT_EQ(dev.queue(0).stats().chains.load(), 50u);
}

TEST(Device, BusyModeTellsDriverNotToKick) {
  EchoBackend be;
  Device dev(be, opts(PollMode::busy));
  Rig rig;
  bring_up(dev, rig);
  rig.configure(dev, 0, /*use_kick=*/true);
  echo_round_trips(rig, 0, 20);
  // Notifications are disabled at start and never re-enabled: the driver stops kicking.
  rig.post(0, "x", 100);
  EXPECT_FALSE(rig.driver(0).needs_kick());
  ASSERT_TRUE(rig.wait_used(0, kWaitMs).has_value());
}

TEST(Device, AdaptiveModeSleepsAndWakesOnKick) {
  EchoBackend be;
  Device dev(be, opts(PollMode::adaptive));
  Rig rig;
  bring_up(dev, rig);
  rig.configure(dev, 0);
  echo_round_trips(rig, 0, 10);
  // Past the spin budget the worker turns notifications on (avail_event = the 10 chains it has
  // seen) and, with nothing new on the ring, sleeps: the next request must be kicked and must
  // wake it. avail_event reaches 10 only in that last arm, after the 10th chain was taken.
  auto* avail_event = virtq::avail_event_word(rig.driver(0).split().used(), rig.driver(0).size());
  ASSERT_TRUE(eventually([&] {
    return std::atomic_ref<std::uint16_t>(*avail_event).load(std::memory_order_acquire) == 10;
  })) << "avail_event "
      << *avail_event;
  const auto wakeups = dev.worker_for(0).wakeups();
  echo_round_trips(rig, 0, 5, 10);
  EXPECT_GT(dev.worker_for(0).wakeups(), wakeups);
  EXPECT_GT(dev.queue(0).stats().kicks.load(), 0u);
  EXPECT_EQ(dev.queue(0).stats().chains.load(), 15u);
}

TEST(Device, TwoQueuesServedIndependently) {
  EchoBackend be;
  Device dev(be, opts(PollMode::event));
  Rig rig;
  bring_up(dev, rig);
  rig.configure(dev, 0);
  rig.configure(dev, 1);
  echo_round_trips(rig, 0, 5);
  echo_round_trips(rig, 1, 5);
  EXPECT_EQ(dev.queue(1).stats().chains.load(), 5u);
}

TEST(Device, GetVringBaseReturnsIndexAndStopsProcessing) {
  EchoBackend be;
  Device dev(be, opts(PollMode::event));
  Rig rig;
  bring_up(dev, rig);
  rig.configure(dev, 0);
  echo_round_trips(rig, 0, 7);
  auto base = dev.get_vring_base(0);
  ASSERT_TRUE(base.has_value());
  EXPECT_EQ(*base, 7u);
  EXPECT_FALSE(dev.queue(0).started());
  EXPECT_EQ(be.stopped_calls.load(), 1);
  // Stopped: a request made now is not served. Its kick (on the rig's copy of the old kick fd)
  // would be ready before flush()'s wake-up, and the worker runs fd handlers before work items:
  // once the flush is through, a ring still watched would have answered.
  rig.post(0, "late", 7);
  dev.worker_for(0).flush();
  EXPECT_FALSE(rig.driver(0).get_used().has_value());
  EXPECT_EQ(dev.queue(0).stats().chains.load(), 7u);
}

TEST(Device, GetVringBaseOnNeverStartedRingReturnsBase) {
  EchoBackend be;
  Device dev(be, opts(PollMode::event));
  Rig rig;
  bring_up(dev, rig);
  ASSERT_TRUE(dev.set_vring_base(1, 1234).has_value());
  auto base = dev.get_vring_base(1);
  ASSERT_TRUE(base.has_value());
  EXPECT_EQ(*base, 1234u);
  EXPECT_EQ(be.stopped_calls.load(), 0);
}

TEST(Device, RestartFromBaseServesPendingRequest) {
  EchoBackend be;
  Device dev(be, opts(PollMode::event));
  Rig rig;
  bring_up(dev, rig);
  rig.configure(dev, 0);
  echo_round_trips(rig, 0, 4);
  auto base = dev.get_vring_base(0);
  ASSERT_TRUE(base.has_value());
  rig.post(0, "while stopped", 4);  // made available while the ring is stopped
  ASSERT_TRUE(dev.set_vring_base(0, *base).has_value());
  auto kick = testing::make_eventfd();
  ASSERT_TRUE(dev.set_vring_kick(0, testing::dup_fd(kick.get())).has_value());
  rig.set_kick(0, std::move(kick));
  ASSERT_TRUE(dev.queue(0).started());
  auto u = rig.wait_used(0, kWaitMs);
  ASSERT_TRUE(u.has_value());
  EXPECT_EQ(u->token, 4u);
  EXPECT_EQ(rig.reply(0, 4, 13), "while stopped");
  echo_round_trips(rig, 0, 3, 5);
  EXPECT_EQ(*dev.get_vring_base(0), 8u);
}

// A driver that restarts a ring at base 0 while its used ring stands further on (DPDK's
// virtio-user reconnecting to a restarted back-end): served from the used index, the old
// chains are not taken again.
TEST(Device, RestartWithABaseBehindTheUsedIndexResumesFromIt) {
  EchoBackend be;
  Device dev(be, opts(PollMode::event));
  Rig rig;
  bring_up(dev, rig);
  rig.configure(dev, 0);
  echo_round_trips(rig, 0, 4);
  ASSERT_EQ(*dev.get_vring_base(0), 4u);
  ASSERT_TRUE(dev.set_vring_base(0, 0).has_value());
  auto kick = testing::make_eventfd();
  ASSERT_TRUE(dev.set_vring_kick(0, testing::dup_fd(kick.get())).has_value());
  rig.set_kick(0, std::move(kick));
  ASSERT_TRUE(dev.queue(0).started());
  rig.post(0, "after restart", 4);
  auto u = rig.wait_used(0, kWaitMs);
  ASSERT_TRUE(u.has_value());
  EXPECT_EQ(u->token, 4u);
  EXPECT_EQ(rig.reply(0, 4, 13), "after restart");
  EXPECT_EQ(*dev.get_vring_base(0), 5u);
  // One used entry for the one new chain; none for the four answered before the restart.
  EXPECT_EQ(rig.driver(0).split().used()->idx, 5u);
  EXPECT_EQ(rig.driver(0).bad_used(), 0u);
}

TEST(Device, SetMemTableWhileRunning) {
  EchoBackend be;
  Device dev(be, opts(PollMode::event));
  Rig rig;
  bring_up(dev, rig);
  rig.configure(dev, 0);
  rig.configure(dev, 1);
  echo_round_trips(rig, 0, 3);
  const std::uint8_t* before = dev.memory().uva_to_host(rig.uva(0), 1);
  // A new table (a fresh mapping of the same memfd) replaces the old under running rings.
  auto r = dev.set_mem_table(rig.table());
  ASSERT_TRUE(r.has_value()) << r.error().message();
  EXPECT_NE(dev.memory().uva_to_host(rig.uva(0), 1), before);
  // Each running ring's backend was told to finish what it holds before the old table went.
  EXPECT_EQ(be.quiesce_calls.load(), 2);
  EXPECT_TRUE(dev.queue(0).started());
  echo_round_trips(rig, 0, 3, 3);
  echo_round_trips(rig, 1, 3);
  EXPECT_EQ(*dev.get_vring_base(0), 6u);
}

TEST(Device, SetMemTableWhileRunningOnTwoWorkers) {
  EchoBackend be;
  auto o = opts(PollMode::event);
  o.cpus = {0, 1};
  o.queues_per_worker = 1;
  Device dev(be, o);
  ASSERT_EQ(dev.worker_count(), 2u);
  EXPECT_NE(&dev.worker_for(0), &dev.worker_for(1));
  Rig rig;
  bring_up(dev, rig);
  rig.configure(dev, 0);
  rig.configure(dev, 1);
  for (int round = 0; round < 3; ++round) {
    echo_round_trips(rig, 0, 2, round * 2);
    echo_round_trips(rig, 1, 2, round * 2);
    ASSERT_TRUE(dev.set_mem_table(rig.table()).has_value());
  }
  echo_round_trips(rig, 1, 2, 6);
}

TEST(Device, UnpinnedWorkersSpreadQueuesWithoutCpuList) {
  EchoBackend be;
  auto o = opts(PollMode::event);
  o.cpus.clear();
  o.unpinned_workers = 2;
  o.queues_per_worker = 1;
  Device dev(be, o);
  EXPECT_EQ(dev.worker_count(), 2u);
  EXPECT_NE(&dev.worker_for(0), &dev.worker_for(1));
  EXPECT_FALSE(dev.worker_for(0).options().cpu.has_value());
}

TEST(Device, BadChainCountedAsErrorRingKeepsRunning) {
  EchoBackend be;
  Device dev(be, opts(PollMode::event));
  Rig rig;
  bring_up(dev, rig);
  rig.configure(dev, 0);
  // A buffer far outside guest memory costs that request, not the ring.
  virtq::DriverQueue::Buffer out{0x7000000000, 16};
  virtq::DriverQueue::Buffer in{Rig::kDataGpa, 16};
  ASSERT_TRUE(rig.driver(0).add({&out, 1}, {&in, 1}, 99).has_value());
  rig.driver(0).publish();
  const std::uint64_t one = 1;
  ASSERT_EQ(::write(rig.kick_fd(0), &one, 8), 8);
  auto u = rig.wait_used(0, kWaitMs);
  ASSERT_TRUE(u.has_value());
  EXPECT_EQ(u->len, 0u);
  // The worker adds the counter right after the handler that published the used entry returns,
  // on the same thread: a work item queued now runs after it.
  dev.worker_for(0).flush();
  EXPECT_EQ(dev.queue(0).stats().errors.load(), 1u);
  EXPECT_FALSE(dev.broken());
  echo_round_trips(rig, 0, 2, 1);
}

TEST(Device, BrokenRingStopsSignalsErrAndOthersLiveOn) {
  EchoBackend be;
  Device dev(be, opts(PollMode::event));
  Rig rig;
  bring_up(dev, rig);
  rig.configure(dev, 0);
  rig.configure(dev, 1);
  auto err = testing::make_eventfd();
  ASSERT_TRUE(dev.set_vring_err(0, testing::dup_fd(err.get())).has_value());
  echo_round_trips(rig, 0, 2);
  // The driver's avail idx runs away by more than the ring size.
  std::atomic_ref<std::uint16_t>(rig.driver(0).split().avail()->idx)
      .store(static_cast<std::uint16_t>(rig.driver(0).split().avail()->idx + 1000),
             std::memory_order_release);
  const std::uint64_t one = 1;
  ASSERT_EQ(::write(rig.kick_fd(0), &one, 8), 8);
  ASSERT_TRUE(testing::wait_fd(err.get(), kWaitMs)) << "err eventfd not signalled";
  EXPECT_TRUE(dev.broken());
  EXPECT_TRUE(dev.queue(0).broken());
  EXPECT_FALSE(dev.queue(0).started());
  EXPECT_EQ(be.stopped_calls.load(), 1);
  // Kicking again is harmless: the ring is no longer watched. Were it watched, the kick would be
  // handled no later than the flush (fd handlers run before work items), signalling err again.
  ASSERT_EQ(::write(rig.kick_fd(0), &one, 8), 8);
  dev.worker_for(0).flush();
  EXPECT_FALSE(testing::wait_fd(err.get(), 0));
  // The other ring and the process live on.
  echo_round_trips(rig, 1, 3);
  EXPECT_TRUE(dev.get_vring_base(0).has_value());
}

TEST(Device, ResetLeavesNoFdsAndServesSecondConnection) {
  EchoBackend be;
  const std::size_t fds_before = vhostkit::testing::open_fd_count();
  {
    Device dev(be, opts(PollMode::event));
    for (int conn = 0; conn < 2; ++conn) {
      Rig rig;
      const std::size_t fds_rig = vhostkit::testing::open_fd_count();
      bring_up(dev, rig);
      rig.configure(dev, 0);
      rig.configure(dev, 1);
      auto err = testing::make_eventfd();
      ASSERT_TRUE(dev.set_vring_err(0, testing::dup_fd(err.get())).has_value());
      echo_round_trips(rig, 0, 3);
      echo_round_trips(rig, 1, 3);
      EXPECT_EQ(dev.queue(0).stats().chains.load(), 3u) << "connection " << conn;
      dev.reset();
      EXPECT_FALSE(dev.has_owner());
      EXPECT_EQ(dev.features(), 0u);
      EXPECT_EQ(dev.memory().region_count(), 0u);
      EXPECT_FALSE(dev.queue(0).started());
      err.reset();
      // The rig's own fds (memfd, kick, call) are still open; nothing of the device's is.
      EXPECT_EQ(vhostkit::testing::open_fd_count(), fds_rig + 4) << "connection " << conn;
    }
  }
  EXPECT_EQ(vhostkit::testing::open_fd_count(), fds_before);
}

TEST(Device, ResetOwnerThenNewOwner) {
  EchoBackend be;
  Device dev(be, opts(PollMode::busy));
  Rig rig;
  bring_up(dev, rig);
  rig.configure(dev, 0, false);
  echo_round_trips(rig, 0, 2);
  ASSERT_TRUE(dev.reset_owner().has_value());
  EXPECT_FALSE(dev.has_owner());
  EXPECT_FALSE(dev.worker_for(0).running());
  Rig rig2;
  bring_up(dev, rig2);
  rig2.configure(dev, 0, false);
  echo_round_trips(rig2, 0, 2);
}

TEST(Device, SetVringCallWhileRunningSwitchesFd) {
  EchoBackend be;
  Device dev(be, opts(PollMode::event));
  Rig rig;
  bring_up(dev, rig);
  rig.configure(dev, 0);
  auto call2 = testing::make_eventfd();
  ASSERT_TRUE(dev.set_vring_call(0, testing::dup_fd(call2.get())).has_value());
  rig.post(0, "abc", 1);
  ASSERT_TRUE(testing::wait_fd(call2.get(), kWaitMs));
  EXPECT_FALSE(testing::wait_fd(rig.call_fd(0), 0));
}

TEST(Device, DisableStopsRingEnableResumes) {
  EchoBackend be;
  Device dev(be, opts(PollMode::event));
  Rig rig;
  bring_up(dev, rig);
  rig.configure(dev, 0);
  echo_round_trips(rig, 0, 2);
  ASSERT_TRUE(dev.set_vring_enable(0, false).has_value());
  EXPECT_FALSE(dev.queue(0).started());
  rig.post(0, "queued", 2);
  // Its kick would be ready before flush()'s wake-up, and fd handlers run before work items: a
  // ring still served would have answered by the time the flush is through.
  dev.worker_for(0).flush();
  EXPECT_FALSE(rig.driver(0).get_used().has_value());
  ASSERT_TRUE(dev.set_vring_enable(0, true).has_value());
  auto u = rig.wait_used(0, kWaitMs);
  ASSERT_TRUE(u.has_value());
  EXPECT_EQ(u->token, 2u);
}

// Live migration: with a log given (SET_LOG_BASE), nothing is marked until LOG_ALL is acked;
// LOG_ALL acked on a running ring marks every reply buffer the device writes and the used ring
// (VHOST_VRING_F_LOG); LOG_ALL taken back stops the marks. Pages are 4 KiB: token t's reply
// buffer lies in page (kDataGpa + t * 0x800 + 0x400) / 4096.
TEST(Device, DirtyLogMarksDeviceWritesWhileLogAllIsAcked) {
  EchoBackend be;
  Device dev(be, opts(PollMode::event));
  dev.add_offered_features(virtio::bit(virtio::feature::log_all));
  Rig rig;
  bring_up(dev, rig);
  vhostkit::testing::SharedLog log;
  ASSERT_TRUE(log.ok());
  auto dirty = [&](std::uint64_t gpa) { return log.dirty(gpa); };
  auto reply_gpa = [](std::uint64_t token) { return Rig::kDataGpa + token * 0x800 + 0x400; };
  auto lr = dev.set_log_base(log.fd(), log.size(), 0);
  ASSERT_TRUE(lr.has_value()) << lr.error().message();
  rig.init_driver(0);
  memory::VringAddr a = rig.addr(0);
  a.flags = virtio::kVhostVringFLog;
  ASSERT_TRUE(dev.set_vring_num(0, 256).has_value());
  ASSERT_TRUE(dev.set_vring_addr(0, a).has_value());
  auto kick = testing::make_eventfd();
  ASSERT_TRUE(dev.set_vring_kick(0, testing::dup_fd(kick.get())).has_value());
  rig.set_kick(0, std::move(kick));
  auto call = testing::make_eventfd();
  ASSERT_TRUE(dev.set_vring_call(0, testing::dup_fd(call.get())).has_value());
  ASSERT_TRUE(dev.set_vring_enable(0, true).has_value());
  const std::uint64_t used_gpa = rig.driver(0).used_gpa();

  rig.post(0, "not logged yet", 0);
  ASSERT_TRUE(rig.wait_used(0, kWaitMs).has_value());
  EXPECT_FALSE(dirty(reply_gpa(0)));
  EXPECT_FALSE(dirty(used_gpa));

  // The ring keeps running; QEMU turns logging on exactly like this.
  ASSERT_TRUE(dev.set_features(kEchoFeatures | virtio::bit(virtio::feature::log_all)));
  EXPECT_TRUE(dev.queue(0).started());
  rig.post(0, "log me", 2);
  ASSERT_TRUE(rig.wait_used(0, kWaitMs).has_value());
  EXPECT_EQ(rig.reply(0, 2, 6), "log me");
  EXPECT_TRUE(dirty(reply_gpa(2)));
  EXPECT_TRUE(dirty(used_gpa));
  EXPECT_FALSE(dirty(reply_gpa(4)));

  ASSERT_TRUE(dev.set_features(kEchoFeatures));
  log.clear();
  rig.post(0, "off again", 4);
  ASSERT_TRUE(rig.wait_used(0, kWaitMs).has_value());
  EXPECT_FALSE(dirty(reply_gpa(4)));
  EXPECT_FALSE(dirty(used_gpa));
}

TEST(Device, ThreadNamedAfterDevice) {
  EchoBackend be;
  Device dev(be, opts(PollMode::event, "netdev-abc"));
  ASSERT_TRUE(dev.set_owner().has_value());
  std::string comm;
  dev.worker_for(0).run_sync([&] {
    std::ifstream f("/proc/thread-self/comm");
    std::getline(f, comm);
  });
  EXPECT_EQ(comm, "vk-netdev-abc");
}

}  // namespace
}  // namespace vhostkit::vhost
