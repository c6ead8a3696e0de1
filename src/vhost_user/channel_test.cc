// The unix-socket transport over real sockets: messages with fds, listen/connect/accept.
#include "vhostkit/vhost_user/channel.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <thread>
#include <vector>

#include "testing/fd_count.h"
#include "testing/sockets.h"

namespace vhostkit::vhost_user {
namespace {

using vhostkit::testing::make_fd;
using vhostkit::testing::open_fd_count;
using vhostkit::testing::same_file;

std::pair<Channel, Channel> make_pair() {
  auto p = socketpair();
  EXPECT_TRUE(p) << p.error().message();
  return std::move(*p);
}

TEST(Channel, SocketpairEndsAreCloexec) {
  auto [a, b] = make_pair();
  EXPECT_TRUE(::fcntl(a.fd(), F_GETFD) & FD_CLOEXEC);
  EXPECT_TRUE(::fcntl(b.fd(), F_GETFD) & FD_CLOEXEC);
}

TEST(Channel, SendsAndReceivesMessageWithoutFds) {
  auto [front, back] = make_pair();
  ASSERT_TRUE(front.send_message(SetVringNum{.index = 1, .num = 512}, kNeedReplyFlag));
  auto got = back.recv();
  ASSERT_TRUE(got) << got.error().message();
  EXPECT_TRUE(got->header.need_reply());
  EXPECT_EQ(got->fds.size(), 0u);
  auto msg = decode(std::move(*got));
  ASSERT_TRUE(msg) << msg.error().message();
  auto& num = std::get<SetVringNum>(*msg);
  EXPECT_EQ(num.index, 1u);
  EXPECT_EQ(num.num, 512u);
}

TEST(Channel, PassesFdsWithSetMemTable) {
  const auto before = open_fd_count();
  {
    auto [front, back] = make_pair();
    SetMemTable table;
    for (std::uint64_t i = 0; i < kMaxMemRegions; ++i) {
      table.regions.push_back(memory::RegionFd{
          {.guest_phys_addr = i << 20, .size = 1 << 20, .userspace_addr = i << 32}, make_fd()});
    }
    ASSERT_TRUE(front.send_message(table));
    auto got = back.recv();
    ASSERT_TRUE(got) << got.error().message();
    EXPECT_EQ(got->fds.size(), kMaxMemRegions);
    for (std::size_t i = 0; i < got->fds.size(); ++i) {
      EXPECT_TRUE(::fcntl(got->fds[i], F_GETFD) & FD_CLOEXEC) << "fd " << i;
    }
    auto msg = decode(std::move(*got));
    ASSERT_TRUE(msg) << msg.error().message();
    auto& back_table = std::get<SetMemTable>(*msg);
    ASSERT_EQ(back_table.regions.size(), kMaxMemRegions);
    for (std::size_t i = 0; i < kMaxMemRegions; ++i) {
      EXPECT_EQ(back_table.regions[i].spec.guest_phys_addr, table.regions[i].spec.guest_phys_addr);
      EXPECT_TRUE(same_file(back_table.regions[i].fd.get(), table.regions[i].fd.get()));
    }
  }
  EXPECT_EQ(open_fd_count(), before);
}

TEST(Channel, KickFdAndRepliesBackAndForth) {
  auto [front, back] = make_pair();
  SetVringKick kick{.index = 0, .fd = make_fd()};
  ASSERT_TRUE(front.send_message(kick));
  ASSERT_TRUE(front.send_message(GetFeatures{}));
  auto m1 = back.recv();
  ASSERT_TRUE(m1);
  auto k = decode(std::move(*m1));
  ASSERT_TRUE(k);
  EXPECT_TRUE(same_file(std::get<SetVringKick>(*k).fd.get(), kick.fd.get()));
  auto m2 = back.recv();
  ASSERT_TRUE(m2);
  ASSERT_TRUE(decode(std::move(*m2)));
  ASSERT_TRUE(back.send(reply_u64(Request::get_features, 0x1'0000'0000ull)));
  auto reply = front.recv();
  ASSERT_TRUE(reply);
  auto features = decode_u64_reply(*reply, Request::get_features);
  ASSERT_TRUE(features) << features.error().message();
  EXPECT_EQ(*features, 0x1'0000'0000ull);
}

TEST(Channel, ManyMessagesInOneStream) {
  auto [front, back] = make_pair();
  // Back-to-back writes land in one socket buffer; recv() must split them exactly.
  for (std::uint32_t i = 0; i < 100; ++i) {
    ASSERT_TRUE(front.send_message(SetVringBase{.index = i % 4, .num = i}));
  }
  for (std::uint32_t i = 0; i < 100; ++i) {
    auto got = back.recv();
    ASSERT_TRUE(got) << got.error().message();
    auto m = decode(std::move(*got));
    ASSERT_TRUE(m);
    EXPECT_EQ(std::get<SetVringBase>(*m).num, i);
  }
}

TEST(Channel, PeerCloseIsDisconnected) {
  auto [front, back] = make_pair();
  front.release().reset();
  auto got = back.recv();
  ASSERT_FALSE(got);
  EXPECT_EQ(got.error().code, Errc::disconnected);
}

TEST(Channel, SendToClosedPeerIsDisconnected) {
  auto [front, back] = make_pair();
  back.release().reset();
  auto r = front.send_message(GetFeatures{});
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, Errc::disconnected);
}

TEST(Channel, NothingPendingIsWouldBlockAfterTimeout) {
  auto [front, back] = make_pair();
  ASSERT_TRUE(back.set_timeout(std::chrono::milliseconds(20)));
  auto got = back.recv();
  ASSERT_FALSE(got);
  EXPECT_EQ(got.error().code, Errc::would_block);
  // The stream is still usable.
  ASSERT_TRUE(front.send_message(GetQueueNum{}));
  EXPECT_TRUE(back.recv());
}

TEST(Channel, SendRejectsInconsistentArguments) {
  auto [front, back] = make_pair();
  const std::uint8_t bytes[8] = {};
  EXPECT_FALSE(front.send(Header{.request = 2, .flags = kVersion, .size = 4}, bytes));
  const int fds[9] = {0, 0, 0, 0, 0, 0, 0, 0, 0};
  auto r = front.send(Header{.request = 2, .flags = kVersion, .size = 8}, bytes, fds);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, Errc::too_many);
}

class UnixSocketPath : public ::testing::Test {
 protected:
  const vhostkit::testing::TempSocketDir tmp_;
  const std::string& dir_ = tmp_.dir();
  const std::string path_ = tmp_.path("sock");
};

TEST_F(UnixSocketPath, ListenConnectAccept) {
  auto l = listen_unix(path_);
  ASSERT_TRUE(l) << l.error().message();
  EXPECT_TRUE(::fcntl(l->get(), F_GETFD) & FD_CLOEXEC);
  auto c = connect_unix(path_);
  ASSERT_TRUE(c) << c.error().message();
  auto s = accept(l->get());
  ASSERT_TRUE(s) << s.error().message();
  EXPECT_TRUE(::fcntl(s->fd(), F_GETFD) & FD_CLOEXEC);
  ASSERT_TRUE(c->send_message(SetOwner{}));
  auto got = s->recv();
  ASSERT_TRUE(got);
  EXPECT_EQ(got->header.request, static_cast<std::uint32_t>(Request::set_owner));
}

TEST_F(UnixSocketPath, ReplacesStaleSocket) {
  {
    auto l = listen_unix(path_);
    ASSERT_TRUE(l);
  }  // closed: the file stays behind, nobody listens
  struct stat st{};
  ASSERT_EQ(::lstat(path_.c_str(), &st), 0);
  auto again = listen_unix(path_);
  ASSERT_TRUE(again) << again.error().message();
  EXPECT_TRUE(connect_unix(path_));
}

TEST_F(UnixSocketPath, RefusesLiveSocket) {
  auto l = listen_unix(path_);
  ASSERT_TRUE(l);
  auto second = listen_unix(path_);
  ASSERT_FALSE(second);
  EXPECT_EQ(second.error().code, Errc::bad_state);
  // The first listener still works.
  EXPECT_TRUE(connect_unix(path_));
}

TEST_F(UnixSocketPath, RefusesToRemoveRegularFile) {
  {
    std::ofstream(path_) << "precious";
  }
  auto l = listen_unix(path_);
  ASSERT_FALSE(l);
  EXPECT_EQ(l.error().code, Errc::invalid_argument);
  std::ifstream in(path_);
  std::string content;
  in >> content;
  EXPECT_EQ(content, "precious");
}

TEST_F(UnixSocketPath, ConnectToNothingFails) {
  auto c = connect_unix(path_);
  ASSERT_FALSE(c);
  EXPECT_EQ(c.error().code, Errc::system);
}

TEST_F(UnixSocketPath, LeavesOnlyThePathBehind) {
  // The staging name is renamed onto the path: nothing else appears in the directory.
  auto l = listen_unix(path_);
  ASSERT_TRUE(l) << l.error().message();
  std::vector<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(dir_)) {
    names.push_back(e.path().filename().string());
  }
  EXPECT_EQ(names, std::vector<std::string>{"sock"});
  EXPECT_TRUE(connect_unix(path_));
}

TEST_F(UnixSocketPath, DirectoryTooLongForTheStagingNameStillListens) {
  // A directory of 103 bytes leaves room for "/s" but not for the staging name: bound directly.
  const std::string deep = dir_ + "/" + std::string(103 - dir_.size() - 1, 'd');
  ASSERT_EQ(::mkdir(deep.c_str(), 0700), 0);
  const std::string path = deep + "/s";
  auto l = listen_unix(path);
  ASSERT_TRUE(l) << l.error().message();
  EXPECT_TRUE(connect_unix(path));
  ::unlink(path.c_str());
  ::rmdir(deep.c_str());
}

TEST(UnixSocket, RejectsOverlongPath) {
  auto l = listen_unix(std::string(200, 'x'));
  ASSERT_FALSE(l);
  EXPECT_EQ(l.error().code, Errc::invalid_argument);
}

}  // namespace
}  // namespace vhostkit::vhost_user
