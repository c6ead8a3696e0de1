// A hostile peer against the codec and the channel. Every case is its own test, and every test
// checks that no fd leaked (the fixture counts /proc/self/fd before and after).
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "testing/fd_count.h"
#include "vhostkit/vhost_user/channel.h"
#include "vhostkit/vhost_user/message.h"

namespace vhostkit::vhost_user {
namespace {

using vhostkit::testing::make_fd;
using vhostkit::testing::open_fd_count;

class Hostile : public ::testing::Test {
 protected:
  void SetUp() override {
    auto p = socketpair();
    ASSERT_TRUE(p);
    peer_ = p->first.release();  // the hostile side writes raw bytes
    us_ = std::move(p->second);
    ASSERT_TRUE(us_.set_timeout(std::chrono::milliseconds(100)));
    fds_before_ = open_fd_count();
  }
  void TearDown() override { EXPECT_EQ(open_fd_count(), fds_before_) << "fd leak"; }

  // Raw sendmsg: any bytes, any number of fds (up to the kernel's 253).
  void raw_send(const void* data, std::size_t len, const std::vector<int>& fds = {}) {
    iovec iov{const_cast<void*>(data), len};
    msghdr mh{};
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    std::vector<std::uint8_t> cbuf(CMSG_SPACE(sizeof(int) * fds.size()));
    if (!fds.empty()) {
      mh.msg_control = cbuf.data();
      mh.msg_controllen = cbuf.size();
      cmsghdr* c = CMSG_FIRSTHDR(&mh);
      c->cmsg_level = SOL_SOCKET;
      c->cmsg_type = SCM_RIGHTS;
      c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
      std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
    }
    ASSERT_EQ(::sendmsg(peer_.get(), &mh, MSG_NOSIGNAL), static_cast<ssize_t>(len));
  }

  // Header + payload in one write, the way frontends send.
  void raw_message(std::uint32_t request, std::uint32_t flags,
                   const std::vector<std::uint8_t>& payload, const std::vector<int>& fds = {},
                   std::optional<std::uint32_t> size_field = std::nullopt) {
    Header h{request, flags, size_field.value_or(static_cast<std::uint32_t>(payload.size()))};
    std::vector<std::uint8_t> bytes(sizeof(h));
    std::memcpy(bytes.data(), &h, sizeof(h));
    bytes.insert(bytes.end(), payload.begin(), payload.end());
    raw_send(bytes.data(), bytes.size(), fds);
  }

  // Receives and decodes one message; returns the decode (or recv) error.
  Error recv_error() {
    auto got = us_.recv();
    if (!got) return got.error();
    auto msg = decode(std::move(*got));
    EXPECT_FALSE(msg) << "decoded a hostile message";
    return msg ? Error{} : msg.error();
  }

  // The hostile side hangs up (its fd is ours to count too).
  void peer_close() {
    peer_.reset();
    --fds_before_;
  }

  // The stream must still carry the next message intact.
  void expect_in_sync() {
    raw_message(static_cast<std::uint32_t>(Request::get_features), kVersion, {});
    auto got = us_.recv();
    ASSERT_TRUE(got) << got.error().message();
    auto m = decode(std::move(*got));
    ASSERT_TRUE(m) << m.error().message();
    EXPECT_TRUE(std::holds_alternative<GetFeatures>(*m));
  }

  UniqueFd peer_;
  Channel us_;
  std::size_t fds_before_ = 0;
};

std::uint32_t req(Request r) { return static_cast<std::uint32_t>(r); }

std::vector<std::uint8_t> u64_bytes(std::uint64_t v) {
  std::vector<std::uint8_t> b(8);
  std::memcpy(b.data(), &v, 8);
  return b;
}

// Decodes `payload` with `nfds` fresh fds; the codec must close whatever it doesn't keep.
Result<FrontendMessage> decode_with(std::uint32_t request, const std::vector<std::uint8_t>& payload,
                                    std::size_t nfds, std::uint32_t flags = kVersion) {
  FdList fds;
  for (std::size_t i = 0; i < nfds; ++i) fds.push_back(make_fd());
  Header h{request, flags, static_cast<std::uint32_t>(payload.size())};
  return decode(h, payload, std::move(fds));
}

struct FixedShape {
  Request request;
  std::size_t size;
  std::size_t nfds;
};

// Every request whose payload has one legal size (SET_VRING_KICK/CALL/ERR with a zero u64
// need their one fd).
constexpr FixedShape kFixed[] = {
    {Request::get_features, 0, 0},
    {Request::set_features, 8, 0},
    {Request::set_owner, 0, 0},
    {Request::reset_owner, 0, 0},
    {Request::set_log_base, 16, 1},
    {Request::set_log_fd, 0, 1},
    {Request::set_vring_num, 8, 0},
    {Request::set_vring_addr, 40, 0},
    {Request::set_vring_base, 8, 0},
    {Request::get_vring_base, 8, 0},
    {Request::set_vring_kick, 8, 1},
    {Request::set_vring_call, 8, 1},
    {Request::set_vring_err, 8, 1},
    {Request::get_protocol_features, 0, 0},
    {Request::set_protocol_features, 8, 0},
    {Request::get_queue_num, 0, 0},
    {Request::set_vring_enable, 8, 0},
    {Request::send_rarp, 8, 0},
    {Request::net_set_mtu, 8, 0},
    {Request::set_backend_req_fd, 0, 1},
    {Request::iotlb_msg, 32, 0},
    {Request::set_vring_endian, 8, 0},
    {Request::close_crypto_session, 8, 0},
    {Request::postcopy_advise, 0, 0},
    {Request::postcopy_listen, 0, 0},
    {Request::postcopy_end, 0, 0},
    {Request::get_inflight_fd, 24, 0},
    {Request::set_inflight_fd, 24, 1},
    {Request::gpu_set_socket, 0, 1},
    {Request::reset_device, 0, 0},
    {Request::vring_kick, 8, 0},
    {Request::get_max_mem_slots, 0, 0},
    {Request::add_mem_reg, 40, 1},
    {Request::rem_mem_reg, 40, 0},
    {Request::set_status, 8, 0},
    {Request::get_status, 0, 0},
    {Request::get_shared_object, 16, 0},
    {Request::set_device_state_fd, 8, 1},
    {Request::check_device_state, 0, 0},
};

TEST_F(Hostile, FixedSizeRequestsDecodeAtTheirSize) {
  for (const auto& s : kFixed) {
    auto m = decode_with(req(s.request), std::vector<std::uint8_t>(s.size), s.nfds);
    ASSERT_TRUE(m) << to_string(s.request) << ": " << m.error().message();
    EXPECT_EQ(request_of(*m), s.request);
  }
}

TEST_F(Hostile, PayloadSmallerThanEveryFixedRequestNeeds) {
  for (const auto& s : kFixed) {
    if (s.size == 0) continue;
    for (std::size_t size : {std::size_t{0}, s.size - 1, s.size / 2}) {
      auto m = decode_with(req(s.request), std::vector<std::uint8_t>(size), s.nfds);
      ASSERT_FALSE(m) << to_string(s.request) << " accepted " << size << " bytes";
      EXPECT_EQ(m.error().detail, std::string(to_string(s.request)) + " payload is " +
                                      std::to_string(size) + " bytes, expected " +
                                      std::to_string(s.size));
    }
  }
}

TEST_F(Hostile, PayloadLargerThanEveryFixedRequestNeeds) {
  for (const auto& s : kFixed) {
    for (std::size_t size : {s.size + 1, s.size + 8, kMaxPayloadSize}) {
      auto m = decode_with(req(s.request), std::vector<std::uint8_t>(size), s.nfds);
      ASSERT_FALSE(m) << to_string(s.request) << " accepted " << size << " bytes";
      EXPECT_EQ(m.error().code, Errc::invalid_argument);
      EXPECT_NE(m.error().detail.find(to_string(s.request)), std::string::npos);
    }
  }
}

TEST_F(Hostile, WrongSizeOverTheSocket) {
  raw_message(req(Request::set_vring_num), kVersion, {1, 0, 0, 0});
  auto e = recv_error();
  EXPECT_EQ(e.detail, "SET_VRING_NUM payload is 4 bytes, expected 8");
  expect_in_sync();
}

TEST_F(Hostile, TruncatedHeaderThenClose) {
  const std::uint8_t part[5] = {1, 0, 0, 0, 1};
  raw_send(part, sizeof(part));
  peer_close();
  auto got = us_.recv();
  ASSERT_FALSE(got);
  EXPECT_EQ(got.error().code, Errc::disconnected);
  EXPECT_NE(got.error().detail.find("5 of 12"), std::string::npos) << got.error().detail;
}

TEST_F(Hostile, TruncatedPayloadThenClose) {
  raw_message(req(Request::set_vring_addr), kVersion, std::vector<std::uint8_t>(10), {}, 40);
  peer_close();
  auto got = us_.recv();
  ASSERT_FALSE(got);
  EXPECT_EQ(got.error().code, Errc::disconnected);
}

TEST_F(Hostile, TruncatedPayloadWithFdsThenClose) {
  auto a = make_fd(), b = make_fd();
  raw_message(req(Request::set_mem_table), kVersion, std::vector<std::uint8_t>(8),
              {a.get(), b.get()}, 72);
  peer_close();
  auto got = us_.recv();
  ASSERT_FALSE(got);
  EXPECT_EQ(got.error().code, Errc::disconnected);
}

TEST_F(Hostile, HeaderThenStall) {
  raw_message(req(Request::set_features), kVersion, {1, 2, 3}, {}, 8);
  auto got = us_.recv();
  ASSERT_FALSE(got);
  EXPECT_EQ(got.error().code, Errc::broken);
}

TEST_F(Hostile, SizeFieldOverTheBound) {
  raw_message(req(Request::set_config), kVersion, {}, {}, kMaxPayloadSize + 1);
  auto got = us_.recv();
  ASSERT_FALSE(got);
  EXPECT_EQ(got.error().code, Errc::broken);
  EXPECT_NE(got.error().detail.find(std::to_string(kMaxPayloadSize + 1)), std::string::npos);
}

TEST_F(Hostile, SizeFieldHugeWithFds) {
  auto a = make_fd();
  raw_message(req(Request::set_mem_table), kVersion, {}, {a.get()}, 0xffffffffu);
  auto got = us_.recv();
  ASSERT_FALSE(got);
  EXPECT_EQ(got.error().code, Errc::broken);
}

TEST_F(Hostile, BadVersionBits) {
  for (std::uint32_t flags : {0u, 2u, 3u, kNeedReplyFlag}) {
    auto m = decode_with(req(Request::get_features), {}, 0, flags);
    ASSERT_FALSE(m) << "flags " << flags;
    EXPECT_NE(m.error().detail.find("version"), std::string::npos);
  }
}

TEST_F(Hostile, BadVersionWithFdsClosesThem) {
  auto m = decode_with(req(Request::set_vring_kick), u64_bytes(0), 1, 2);
  ASSERT_FALSE(m);
}

TEST_F(Hostile, RequestWithReplyFlag) {
  auto m = decode_with(req(Request::set_owner), {}, 0, kVersion | kReplyFlag);
  ASSERT_FALSE(m);
  EXPECT_NE(m.error().detail.find("REPLY"), std::string::npos);
}

TEST_F(Hostile, UnknownRequestNumber) {
  for (std::uint32_t n : {0u, 44u, 1000u, 0xffffffffu}) {
    auto m = decode_with(n, {}, 0);
    ASSERT_FALSE(m);
    EXPECT_EQ(m.error().code, Errc::unsupported);
    EXPECT_NE(m.error().detail.find(std::to_string(n)), std::string::npos) << m.error().detail;
  }
}

TEST_F(Hostile, UnknownRequestOverTheSocketKeepsStreamInSync) {
  auto a = make_fd();
  raw_message(9999, kVersion, {1, 2, 3, 4}, {a.get()});
  auto e = recv_error();
  EXPECT_EQ(e.code, Errc::unsupported);
  EXPECT_NE(e.detail.find("9999"), std::string::npos);
  expect_in_sync();
}

TEST_F(Hostile, UnsupportedCryptoSession) {
  auto m = decode_with(req(Request::create_crypto_session), std::vector<std::uint8_t>(16), 0);
  ASSERT_FALSE(m);
  EXPECT_EQ(m.error().code, Errc::unsupported);
}

std::vector<std::uint8_t> mem_table(std::uint32_t nregions, std::size_t regions_sent) {
  std::vector<std::uint8_t> p(8 + regions_sent * 32);
  std::memcpy(p.data(), &nregions, 4);
  return p;
}

TEST_F(Hostile, MemTableMoreThanEightRegions) {
  auto m = decode_with(req(Request::set_mem_table), mem_table(9, 8), 8);
  ASSERT_FALSE(m);
  EXPECT_EQ(m.error().code, Errc::too_many);
  auto huge = decode_with(req(Request::set_mem_table), mem_table(0xffffffffu, 1), 1);
  ASSERT_FALSE(huge);
  EXPECT_EQ(huge.error().code, Errc::too_many);
}

TEST_F(Hostile, MemTableFewerFdsThanRegions) {
  auto m = decode_with(req(Request::set_mem_table), mem_table(3, 3), 2);
  ASSERT_FALSE(m);
  EXPECT_EQ(m.error().detail, "SET_MEM_TABLE carries 2 fds, expected 3");
}

TEST_F(Hostile, MemTableMoreFdsThanRegions) {
  auto m = decode_with(req(Request::set_mem_table), mem_table(1, 1), 4);
  ASSERT_FALSE(m);
  EXPECT_EQ(m.error().code, Errc::too_many);
}

TEST_F(Hostile, MemTableNregionsDisagreesWithSize) {
  auto m = decode_with(req(Request::set_mem_table), mem_table(2, 3), 2);
  ASSERT_FALSE(m);
  EXPECT_EQ(m.error().detail, "SET_MEM_TABLE payload is 104 bytes, expected 72");
  auto shorter = decode_with(req(Request::set_mem_table), mem_table(3, 2), 3);
  ASSERT_FALSE(shorter);
  auto no_head = decode_with(req(Request::set_mem_table), {1, 0, 0}, 0);
  ASSERT_FALSE(no_head);
}

TEST_F(Hostile, FdsOnMessageThatCarriesNone) {
  auto a = make_fd(), b = make_fd(), c = make_fd();
  raw_message(req(Request::set_features), kVersion, u64_bytes(1), {a.get(), b.get(), c.get()});
  const auto with_sent = open_fd_count();
  auto e = recv_error();
  EXPECT_EQ(e.detail, "SET_FEATURES carries 3 fds, expected 0");
  EXPECT_EQ(open_fd_count(), with_sent) << "received copies were not closed";
  expect_in_sync();
}

// A message whose fds did not fit: received with its header, no fds, and refused by decode.
void expect_fds_truncated(Result<Received> got) {
  ASSERT_TRUE(got) << got.error().message();
  EXPECT_TRUE(got->fds_truncated);
  EXPECT_EQ(got->fds.size(), 0u);
  auto m = decode(std::move(*got));
  ASSERT_FALSE(m);
  EXPECT_EQ(m.error().code, Errc::too_many);
  EXPECT_NE(m.error().detail.find("more than 8 fds"), std::string::npos) << m.error().detail;
}

TEST_F(Hostile, TooManyFdsTruncatesControlMessage) {
  // Nine fds: the kernel installs eight and sets MSG_CTRUNC.
  std::vector<UniqueFd> owned;
  std::vector<int> raw;
  for (int i = 0; i < 9; ++i) {
    owned.push_back(make_fd());
    raw.push_back(owned.back().get());
  }
  raw_message(req(Request::set_vring_call), kVersion, u64_bytes(0), raw);
  expect_fds_truncated(us_.recv());
  expect_in_sync();
}

TEST_F(Hostile, MaximumFdsTheKernelAllows) {
  // SCM_MAX_FD is 253; all of the same file is enough to hit the limit.
  auto one = make_fd();
  std::vector<int> raw(253, one.get());
  raw_message(req(Request::set_mem_table), kVersion, mem_table(1, 1), raw);
  expect_fds_truncated(us_.recv());
  expect_in_sync();
}

TEST_F(Hostile, FdsSplitAcrossHeaderAndPayloadOverflow) {
  std::vector<UniqueFd> owned;
  std::vector<int> first, second;
  for (int i = 0; i < 10; ++i) {
    owned.push_back(make_fd());
    (i < 5 ? first : second).push_back(owned.back().get());
  }
  Header h{req(Request::set_features), kVersion, 8};
  raw_send(&h, sizeof(h), first);
  auto payload = u64_bytes(0);
  raw_send(payload.data(), payload.size(), second);
  expect_fds_truncated(us_.recv());
  expect_in_sync();
}

TEST_F(Hostile, KickWithNoFdAndNoNofdBit) {
  raw_message(req(Request::set_vring_kick), kVersion, u64_bytes(0));
  auto e = recv_error();
  EXPECT_EQ(e.detail, "SET_VRING_KICK carries no fd and does not set the no-fd bit");
}

TEST_F(Hostile, KickWithFdAndNofdBit) {
  auto a = make_fd();
  raw_message(req(Request::set_vring_kick), kVersion, u64_bytes(kVringNoFdMask), {a.get()});
  auto e = recv_error();
  EXPECT_EQ(e.code, Errc::too_many);
}

TEST_F(Hostile, KickWithTwoFds) {
  auto m = decode_with(req(Request::set_vring_call), u64_bytes(1), 2);
  ASSERT_FALSE(m);
  EXPECT_EQ(m.error().code, Errc::too_many);
}

TEST_F(Hostile, VringFdReservedBits) {
  auto m = decode_with(req(Request::set_vring_err), u64_bytes(std::uint64_t{1} << 40 | 3), 1);
  ASSERT_FALSE(m);
  EXPECT_NE(m.error().detail.find("above bit 8"), std::string::npos);
}

TEST_F(Hostile, LogBaseWithoutFd) {
  auto m = decode_with(req(Request::set_log_base), std::vector<std::uint8_t>(16), 0);
  ASSERT_FALSE(m);
}

TEST_F(Hostile, RemMemRegStrayFdIsClosed) {
  auto one = decode_with(req(Request::rem_mem_reg), std::vector<std::uint8_t>(40), 1);
  ASSERT_TRUE(one) << one.error().message();  // tolerated by the spec, fd closed
  auto two = decode_with(req(Request::rem_mem_reg), std::vector<std::uint8_t>(40), 2);
  ASSERT_FALSE(two);
}

std::vector<std::uint8_t> config(std::uint32_t size_field, std::size_t data_bytes) {
  std::vector<std::uint8_t> p(12 + data_bytes);
  std::memcpy(p.data() + 4, &size_field, 4);
  return p;
}

TEST_F(Hostile, ConfigSizeOverLimit) {
  auto m = decode_with(req(Request::set_config), config(257, 256), 0);
  ASSERT_FALSE(m);
  EXPECT_EQ(m.error().code, Errc::out_of_range);
  auto huge = decode_with(req(Request::get_config), config(0xffffffffu, 4), 0);
  ASSERT_FALSE(huge);
}

// No config space at all is refused by the codec, for both requests; the session never sees it.
TEST_F(Hostile, ConfigSizeZero) {
  auto get = decode_with(req(Request::get_config), config(0, 0), 0);
  ASSERT_FALSE(get);
  EXPECT_EQ(get.error().code, Errc::invalid_argument);
  EXPECT_EQ(get.error().detail, "GET_CONFIG config size 0 is not in 1..256");
  auto set = decode_with(req(Request::set_config), config(0, 0), 0);
  ASSERT_FALSE(set);
  EXPECT_EQ(set.error().detail, "SET_CONFIG config size 0 is not in 1..256");
}

TEST_F(Hostile, ConfigSizeDisagreesWithPayload) {
  auto m = decode_with(req(Request::set_config), config(8, 4), 0);
  ASSERT_FALSE(m);
  EXPECT_EQ(m.error().detail, "SET_CONFIG payload is 16 bytes, expected 20");
  auto shorter = decode_with(req(Request::set_config), {0, 0, 0}, 0);
  ASSERT_FALSE(shorter);
}

TEST_F(Hostile, HeaderSizeDisagreesWithPayloadSpan) {
  std::vector<std::uint8_t> p(8);
  Header h{req(Request::set_features), kVersion, 16};
  auto m = decode(h, p, FdList{});
  ASSERT_FALSE(m);
}

TEST_F(Hostile, BackendRequestWithWrongFds) {
  FdList fds;
  fds.push_back(make_fd());
  std::vector<std::uint8_t> p(8);
  auto m =
      decode_backend(Header{static_cast<std::uint32_t>(BackendRequest::vring_call), kVersion, 8}, p,
                     std::move(fds));
  ASSERT_FALSE(m);
  auto unknown = decode_backend(Header{77, kVersion, 0}, {}, FdList{});
  ASSERT_FALSE(unknown);
  EXPECT_NE(unknown.error().detail.find("77"), std::string::npos);
}

TEST_F(Hostile, ReplyWithFdsWhereNoneBelong) {
  Received r;
  r.header = Header{req(Request::get_features), kVersion | kReplyFlag, 8};
  r.fds.push_back(make_fd());
  auto v = decode_u64_reply(r, Request::get_features);
  ASSERT_FALSE(v);
}

TEST_F(Hostile, FdListDropsPastCapacity) {
  FdList fds;
  for (std::size_t i = 0; i < kMaxFds; ++i) ASSERT_TRUE(fds.push_back(make_fd()));
  EXPECT_FALSE(fds.push_back(make_fd()));  // closed, not leaked
  EXPECT_EQ(fds.size(), kMaxFds);
}

}  // namespace
}  // namespace vhostkit::vhost_user
