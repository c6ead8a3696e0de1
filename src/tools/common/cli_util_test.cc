#include "cli_util.h"

#include <signal.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <thread>

#include <gtest/gtest.h>

#include "testing/sockets.h"

namespace vhostkit::cli {
namespace {

TEST(CpuList, SinglesAndRanges) {
  auto r = parse_cpu_list("1-3,0,6");
  ASSERT_TRUE(r) << r.error().message();
  EXPECT_EQ(*r, (std::vector<int>{1, 2, 3, 0, 6}));
}

TEST(CpuList, RejectsGarbageDuplicatesAndBackwardRanges) {
  EXPECT_FALSE(parse_cpu_list(""));
  EXPECT_FALSE(parse_cpu_list("a"));
  EXPECT_FALSE(parse_cpu_list("1,,2"));
  EXPECT_FALSE(parse_cpu_list("3-1"));
  EXPECT_FALSE(parse_cpu_list("1,1"));
  EXPECT_FALSE(parse_cpu_list("-1"));
  EXPECT_FALSE(parse_cpu_list("99999"));
}

TEST(Mac, ParsesAndFormats) {
  auto m = parse_mac("52:54:00:AB:cd:0f");
  ASSERT_TRUE(m);
  EXPECT_EQ(format_mac(*m), "52:54:00:ab:cd:0f");
  EXPECT_TRUE(parse_mac("02-00-00-00-00-01"));
}

TEST(Mac, RejectsMalformedAndMulticast) {
  EXPECT_FALSE(parse_mac("52:54:00:12:34"));
  EXPECT_FALSE(parse_mac("52:54:00:12:34:5g"));
  EXPECT_FALSE(parse_mac("52:54:00:12:34:567"));
  EXPECT_FALSE(parse_mac("01:00:5e:00:00:01"));
}

TEST(LogLevel, KnownLevelsOnly) {
  EXPECT_TRUE(set_log_level("debug"));
  EXPECT_TRUE(set_log_level("off"));
  EXPECT_FALSE(set_log_level("loud"));
  EXPECT_TRUE(set_log_level("info"));
}

// SIGTERM sent to this process while block_stop_signals() holds it; consumed (read from the
// signalfd) at the end so the next test starts with nothing pending.
class StopSignal : public ::testing::Test {
 protected:
  void SetUp() override {
    auto fd = block_stop_signals();
    ASSERT_TRUE(fd) << fd.error().message();
    sigfd_ = std::move(*fd);
  }
  void TearDown() override {
    signalfd_siginfo info{};
    while (::read(sigfd_.get(), &info, sizeof info) == static_cast<ssize_t>(sizeof info)) {
    }
  }
  // Process-directed, as a user's kill is: the signalfd sees it from any thread.
  static void raise_term() { ASSERT_EQ(::kill(::getpid(), SIGTERM), 0); }

  UniqueFd sigfd_;
};

TEST_F(StopSignal, AcceptReturnsTheConnectingPeer) {
  const vhostkit::testing::TempSocketDir tmp;
  const std::string path = tmp.path("s.sock");
  auto l = vhost_user::listen_unix(path);
  ASSERT_TRUE(l) << l.error().message();
  auto peer = vhost_user::connect_unix(path);
  ASSERT_TRUE(peer) << peer.error().message();
  auto ch = accept_unless_stopped(l->get(), sigfd_.get());
  ASSERT_TRUE(ch) << ch.error().message();
  ASSERT_TRUE(ch->has_value());
  EXPECT_TRUE((*ch)->valid());
}

TEST_F(StopSignal, AcceptEndsOnSigtermWithNoPeer) {
  const vhostkit::testing::TempSocketDir tmp;
  const std::string path = tmp.path("s.sock");
  auto l = vhost_user::listen_unix(path);
  ASSERT_TRUE(l) << l.error().message();
  raise_term();
  auto ch = accept_unless_stopped(l->get(), sigfd_.get());
  ASSERT_TRUE(ch) << ch.error().message();
  EXPECT_FALSE(ch->has_value());
}

TEST_F(StopSignal, SigtermEndsAReplyWaitOnTheWatchedSocket) {
  auto pair = vhost_user::socketpair();
  ASSERT_TRUE(pair) << pair.error().message();
  auto& [ours, silent_peer] = *pair;
  // Far longer than the test may take: only the shutdown can end this wait in time.
  ASSERT_TRUE(ours.set_timeout(std::chrono::seconds(60)));
  auto watch = ShutdownOnStop::start(sigfd_.get(), ours.fd());
  ASSERT_TRUE(watch) << watch.error().message();
  EXPECT_FALSE((*watch)->stopped());
  std::thread killer([] { raise_term(); });
  auto msg = ours.recv();
  killer.join();
  ASSERT_FALSE(msg);
  EXPECT_EQ(msg.error().code, Errc::disconnected) << msg.error().message();
  EXPECT_TRUE((*watch)->stopped());
}

TEST_F(StopSignal, WithoutASignalTheSocketIsLeftAlone) {
  auto pair = vhost_user::socketpair();
  ASSERT_TRUE(pair) << pair.error().message();
  auto& [a, b] = *pair;
  {
    auto watch = ShutdownOnStop::start(sigfd_.get(), a.fd());
    ASSERT_TRUE(watch) << watch.error().message();
    EXPECT_FALSE((*watch)->stopped());
  }
  vhost_user::Header h{};
  h.request = static_cast<std::uint32_t>(vhost_user::Request::get_features);
  h.flags = vhost_user::kVersion;
  ASSERT_TRUE(b.send(h, {}));
  auto msg = a.recv();
  ASSERT_TRUE(msg) << msg.error().message();
  EXPECT_EQ(msg->header.request, h.request);
}

}  // namespace
}  // namespace vhostkit::cli
