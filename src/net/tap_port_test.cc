#include "vhostkit/net/tap_port.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <linux/capability.h>
#include <linux/if_tun.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <sys/socket.h>
#include <sys/syscall.h>

#include <array>
#include <cstring>
#include <vector>

#include "testing/fd_count.h"
#include "testing/netns.h"
#include "vhostkit/virtio/features.h"
#include "vhostkit/virtio/net.h"

namespace vhostkit::net {
namespace {

using namespace testing;
using vhostkit::testing::open_fd_count;
namespace nf = virtio::net_feature;
using virtio::bit;

constexpr std::uint8_t kPeerMac[6] = {0x02, 0, 0, 0, 0, 0x02};
constexpr std::uint8_t kHostIp[4] = {192, 0, 2, 1};
constexpr std::uint8_t kPeerIp[4] = {192, 0, 2, 2};

class TapPortTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!enter_private_netns()) GTEST_SKIP() << "needs root to create a network namespace";
  }

  // vk0 up with 192.0.2.1/24 and a fixed neighbour 192.0.2.2 (no ARP in the way).
  std::unique_ptr<TapPort> open_configured(std::uint16_t pairs) {
    auto port = TapPort::open("vk0", pairs);
    EXPECT_TRUE(port) << port.error().message();
    if (!port) return nullptr;
    EXPECT_TRUE((*port)->set_link_up(true));
    EXPECT_TRUE(sh("ip addr add 192.0.2.1/24 dev vk0"));
    EXPECT_TRUE(sh("ip neigh add 192.0.2.2 lladdr 02:00:00:00:00:02 dev vk0"));
    return std::move(*port);
  }

  // Receives frames from any pair until `match` accepts one (or a second passes).
  static std::vector<std::uint8_t> recv_matching(
      TapPort& port, const std::function<bool(const std::vector<std::uint8_t>&)>& match,
      std::uint16_t* got_qp = nullptr) {
    std::vector<std::uint8_t> buf(tap_rx_buffer_size(1500, true));
    for (int round = 0; round < 100; ++round) {
      for (std::uint16_t qp = 0; qp < port.queue_pairs(); ++qp) {
        if (!wait_readable(port.rx_fd(qp), 10)) continue;
        iovec iov{buf.data(), buf.size()};
        auto n = port.recv(qp, std::span(&iov, 1));
        if (!n || *n == 0) continue;
        std::vector<std::uint8_t> frame(buf.begin(), buf.begin() + static_cast<long>(*n));
        if (match(frame)) {
          if (got_qp) *got_qp = qp;
          return frame;
        }
      }
    }
    return {};
  }

  static std::vector<std::uint8_t> echo_request(const TapPort& port, std::uint16_t seq) {
    std::uint8_t host_mac[6];
    EXPECT_TRUE(
        parse_mac(read_sys("/sys/class/net/" + std::string(port.ifname()) + "/address"), host_mac));
    auto f = eth_ipv4(host_mac, kPeerMac, kPeerIp, kHostIp, IPPROTO_ICMP, 8 + 32);
    std::uint8_t* icmp = &f[34];
    icmp[0] = 8;  // echo request
    put16(icmp + 4, 0x4242);
    put16(icmp + 6, seq);
    for (int i = 0; i < 32; ++i) icmp[8 + i] = static_cast<std::uint8_t>(i);
    put16(icmp + 2, inet_checksum(icmp, 8 + 32));
    return f;
  }

  static bool is_echo_reply(const std::vector<std::uint8_t>& f) {
    return f.size() >= kTapVnetHdrSize + 34 + 8 && get16(&f[12 + 12]) == 0x0800 &&
           f[12 + 14 + 9] == IPPROTO_ICMP && f[12 + 34] == 0;
  }

  static bool send_frame(TapPort& port, std::uint16_t qp, std::vector<std::uint8_t>& frame,
                         virtio::VirtioNetHdrMrg hdr = {}) {
    iovec iov[2] = {{&hdr, sizeof hdr}, {frame.data(), frame.size()}};
    return port.send(qp, iov);
  }

  // A UDP datagram from the host stack to the peer, which leaves through vk0.
  static void send_udp(std::size_t len, int gso_size = 0) {
    int s = ::socket(AF_INET, SOCK_DGRAM, 0);
    ASSERT_GE(s, 0);
    if (gso_size > 0) {
      ASSERT_EQ(::setsockopt(s, SOL_UDP, UDP_SEGMENT, &gso_size, sizeof gso_size), 0);
    }
    sockaddr_in to{};
    to.sin_family = AF_INET;
    to.sin_port = htons(9);
    std::memcpy(&to.sin_addr, kPeerIp, 4);
    std::vector<std::uint8_t> data(len, 0xab);
    EXPECT_EQ(::sendto(s, data.data(), data.size(), 0, reinterpret_cast<sockaddr*>(&to), sizeof to),
              static_cast<ssize_t>(len));
    ::close(s);
  }

  static bool is_udp(const std::vector<std::uint8_t>& f) {
    return f.size() >= kTapVnetHdrSize + 34 && get16(&f[12 + 12]) == 0x0800 &&
           f[12 + 14 + 9] == IPPROTO_UDP;
  }
};

TEST_F(TapPortTest, OpenCreatesInterfaceAndDestroyRemovesIt) {
  std::size_t fds = open_fd_count();
  {
    auto port = TapPort::open("vk0", 1);
    ASSERT_TRUE(port) << port.error().message();
    EXPECT_TRUE((*port)->created_interface());
    EXPECT_EQ((*port)->ifname(), "vk0");
    EXPECT_EQ((*port)->kind(), "tap");
    EXPECT_TRUE((*port)->vnet_hdr());
    EXPECT_TRUE(iface_exists("vk0"));
    // IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, and not persistent (IFF_PERSIST 0x800).
    unsigned flags = std::stoul(read_sys("/sys/class/net/vk0/tun_flags"), nullptr, 16);
    EXPECT_EQ(flags & 0x0002u, 0x0002u);
    EXPECT_EQ(flags & 0x1000u, 0x1000u);
    EXPECT_EQ(flags & 0x4000u, 0x4000u);
    EXPECT_EQ(flags & 0x0800u, 0u);
    int fd = (*port)->rx_fd(0);
    EXPECT_TRUE(::fcntl(fd, F_GETFL) & O_NONBLOCK);
    EXPECT_TRUE(::fcntl(fd, F_GETFD) & FD_CLOEXEC);
    EXPECT_EQ((*port)->rx_fd(1), -1);
  }
  EXPECT_FALSE(iface_exists("vk0"));
  EXPECT_EQ(open_fd_count(), fds);
}

TEST_F(TapPortTest, KernelAnswersAnEchoRequestSentThroughThePort) {
  auto port = open_configured(1);
  ASSERT_TRUE(port);
  auto req = echo_request(*port, 7);
  ASSERT_TRUE(send_frame(*port, 0, req));

  auto reply = recv_matching(*port, is_echo_reply);
  ASSERT_FALSE(reply.empty()) << "no echo reply";
  const std::uint8_t* eth = &reply[kTapVnetHdrSize];
  EXPECT_EQ(std::memcmp(eth, kPeerMac, 6), 0);
  const std::uint8_t* ip = eth + 14;
  EXPECT_EQ(std::memcmp(ip + 12, kHostIp, 4), 0);
  EXPECT_EQ(std::memcmp(ip + 16, kPeerIp, 4), 0);
  EXPECT_EQ(inet_checksum(ip, 20), 0);
  const std::uint8_t* icmp = ip + 20;
  EXPECT_EQ(icmp[0], 0);  // echo reply
  EXPECT_EQ(get16(icmp + 4), 0x4242);
  EXPECT_EQ(get16(icmp + 6), 7);
  EXPECT_EQ(std::memcmp(icmp + 8, &req[34 + 8], 32), 0);
  EXPECT_EQ(inet_checksum(icmp, get16(ip + 2) - 20u), 0);

  PortStats s = port->stats(0);
  EXPECT_EQ(s.tx_frames, 1u);
  EXPECT_EQ(s.tx_bytes, req.size());
  EXPECT_GE(s.rx_frames, 1u);
  EXPECT_EQ(s.tx_drops, 0u);
}

TEST_F(TapPortTest, TwoQueuePairsGetTwoFdsOnOneMultiQueueTap) {
  auto port = open_configured(2);
  ASSERT_TRUE(port);
  EXPECT_EQ(port->queue_pairs(), 2);
  EXPECT_GE(port->rx_fd(0), 0);
  EXPECT_GE(port->rx_fd(1), 0);
  EXPECT_NE(port->rx_fd(0), port->rx_fd(1));
  unsigned flags = std::stoul(read_sys("/sys/class/net/vk0/tun_flags"), nullptr, 16);
  EXPECT_EQ(flags & 0x0100u, 0x0100u);  // IFF_MULTI_QUEUE
  EXPECT_TRUE(iface_exists("vk0") && std::filesystem::exists("/sys/class/net/vk0/queues/rx-1"));

  // Either queue carries frames into the stack.
  for (std::uint16_t qp = 0; qp < 2; ++qp) {
    auto req = echo_request(*port, qp);
    ASSERT_TRUE(send_frame(*port, qp, req));
    auto reply = recv_matching(*port, [&](const auto& f) {
      return is_echo_reply(f) && get16(&f[kTapVnetHdrSize + 34 + 6]) == qp;
    });
    EXPECT_FALSE(reply.empty()) << "no reply to the request sent on pair " << qp;
  }
  EXPECT_EQ(port->stats(0).tx_frames, 1u);
  EXPECT_EQ(port->stats(1).tx_frames, 1u);
}

TEST(TapPortOffloads, MapsGuestFeaturesToTunFlags) {
  EXPECT_EQ(TapPort::tun_offloads_for(0), 0u);
  EXPECT_EQ(TapPort::tun_offloads_for(bit(nf::guest_csum)), unsigned{TUN_F_CSUM});
  EXPECT_EQ(TapPort::tun_offloads_for(bit(nf::guest_csum) | bit(nf::guest_tso4)),
            unsigned{TUN_F_CSUM | TUN_F_TSO4});
  // Without GUEST_CSUM nothing else counts.
  EXPECT_EQ(TapPort::tun_offloads_for(bit(nf::guest_tso4) | bit(nf::guest_tso6)), 0u);
  // ECN only rides on TSO.
  EXPECT_EQ(TapPort::tun_offloads_for(bit(nf::guest_csum) | bit(nf::guest_ecn)),
            unsigned{TUN_F_CSUM});
  EXPECT_EQ(TapPort::tun_offloads_for(bit(nf::guest_csum) | bit(nf::guest_tso6) |
                                      bit(nf::guest_ecn) | bit(nf::guest_ufo)),
            unsigned{TUN_F_CSUM | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO});
  EXPECT_EQ(
      TapPort::tun_offloads_for(bit(nf::guest_csum) | bit(nf::guest_uso4) | bit(nf::guest_uso6)),
      unsigned{TUN_F_CSUM | 0x20 | 0x40});
  EXPECT_EQ(TapPort::tun_offloads_for(bit(nf::guest_csum) | bit(nf::guest_uso4)),
            unsigned{TUN_F_CSUM});
  // Host-side bits are not receive offloads.
  EXPECT_EQ(TapPort::tun_offloads_for(bit(nf::csum) | bit(nf::host_tso4)), 0u);
}

TEST_F(TapPortTest, WithoutOffloadsTheKernelSendsCompleteChecksums) {
  auto port = open_configured(1);
  ASSERT_TRUE(port);
  send_udp(100);
  auto f = recv_matching(*port, is_udp);
  ASSERT_FALSE(f.empty());
  virtio::VirtioNetHdrMrg hdr;
  std::memcpy(&hdr, f.data(), sizeof hdr);
  EXPECT_EQ(hdr.hdr.flags & virtio::kNetHdrFNeedsCsum, 0);
  EXPECT_EQ(hdr.hdr.gso_type, virtio::kNetHdrGsoNone);
}

TEST_F(TapPortTest, GuestCsumLetsPartialChecksumsThrough) {
  auto port = open_configured(1);
  ASSERT_TRUE(port);
  ASSERT_TRUE(port->set_guest_offloads(bit(nf::guest_csum) | bit(nf::guest_tso4)));
  send_udp(100);
  auto f = recv_matching(*port, is_udp);
  ASSERT_FALSE(f.empty());
  virtio::VirtioNetHdrMrg hdr;
  std::memcpy(&hdr, f.data(), sizeof hdr);
  EXPECT_EQ(hdr.hdr.flags & virtio::kNetHdrFNeedsCsum, virtio::kNetHdrFNeedsCsum);
  EXPECT_EQ(hdr.hdr.csum_start, 14 + 20);
  EXPECT_EQ(hdr.hdr.csum_offset, 6);  // offsetof(udphdr, check)
}

TEST_F(TapPortTest, GuestUsoDeliversOneSegmentedUdpFrame) {
  auto port = open_configured(1);
  ASSERT_TRUE(port);
  ASSERT_TRUE(
      port->set_guest_offloads(bit(nf::guest_csum) | bit(nf::guest_uso4) | bit(nf::guest_uso6)));
  send_udp(3000, 1000);
  auto f = recv_matching(*port, is_udp);
  ASSERT_FALSE(f.empty());
  virtio::VirtioNetHdrMrg hdr;
  std::memcpy(&hdr, f.data(), sizeof hdr);
  if (hdr.hdr.gso_type == virtio::kNetHdrGsoNone) GTEST_SKIP() << "kernel without USO on TAP";
  EXPECT_EQ(hdr.hdr.gso_type, virtio::kNetHdrGsoUdpL4);
  EXPECT_EQ(hdr.hdr.gso_size, 1000);
  EXPECT_EQ(f.size(), kTapVnetHdrSize + 14 + 20 + 8 + 3000);
}

TEST_F(TapPortTest, FrameLargerThanTheBufferIsCountedNotDeliveredCut) {
  auto port = open_configured(1);
  ASSERT_TRUE(port);
  send_udp(1000);
  ASSERT_TRUE(wait_readable(port->rx_fd(0), 1000));
  std::vector<std::uint8_t> small(kTapVnetHdrSize + 200);
  iovec iov{small.data(), small.size()};
  auto n = port->recv(0, std::span(&iov, 1));
  ASSERT_FALSE(n);
  EXPECT_EQ(n.error(), Errc::too_many);
  EXPECT_EQ(port->stats(0).rx_truncated, 1u);
  EXPECT_EQ(port->stats(0).rx_frames, 0u);

  // A buffer of exactly the frame's size is not a truncation.
  send_udp(1000);
  ASSERT_TRUE(wait_readable(port->rx_fd(0), 1000));
  std::vector<std::uint8_t> exact(kTapVnetHdrSize + 14 + 20 + 8 + 1000);
  iovec two[2] = {{exact.data(), 30}, {exact.data() + 30, exact.size() - 30}};
  n = port->recv(0, two);
  ASSERT_TRUE(n);
  EXPECT_EQ(*n, exact.size());
  EXPECT_EQ(port->stats(0).rx_truncated, 1u);
  EXPECT_EQ(port->stats(0).rx_frames, 1u);
}

TEST_F(TapPortTest, BufferSmallerThanTheHeaderIsRefusedWithoutLosingTheFrame) {
  auto port = open_configured(1);
  ASSERT_TRUE(port);
  send_udp(100);
  ASSERT_TRUE(wait_readable(port->rx_fd(0), 1000));
  std::uint8_t tiny[11];
  iovec iov{tiny, sizeof tiny};
  auto n = port->recv(0, std::span(&iov, 1));
  ASSERT_FALSE(n);
  EXPECT_EQ(n.error(), Errc::invalid_argument);
  EXPECT_FALSE(recv_matching(*port, is_udp).empty());
}

TEST_F(TapPortTest, EmptyRingReturnsZero) {
  auto port = TapPort::open("vk0", 1);
  ASSERT_TRUE(port);
  std::vector<std::uint8_t> buf(2048);
  iovec iov{buf.data(), buf.size()};
  auto n = (*port)->recv(0, std::span(&iov, 1));
  ASSERT_TRUE(n);
  EXPECT_EQ(*n, 0u);
  EXPECT_FALSE((*port)->recv(1, std::span(&iov, 1)));
}

TEST_F(TapPortTest, HostileVnetHeaderCostsOnlyThatFrame) {
  auto port = open_configured(1);
  ASSERT_TRUE(port);
  auto req = echo_request(*port, 1);
  virtio::VirtioNetHdrMrg bad{};
  bad.hdr.gso_type = 0x33;  // no such GSO type
  bad.hdr.gso_size = 100;
  EXPECT_FALSE(send_frame(*port, 0, req, bad));
  virtio::VirtioNetHdrMrg huge{};
  huge.hdr.hdr_len = 60000;  // claims more header than the frame has
  huge.hdr.gso_type = virtio::kNetHdrGsoTcpv4;
  huge.hdr.gso_size = 1000;
  EXPECT_FALSE(send_frame(*port, 0, req, huge));
  // Too many pieces for writev.
  std::vector<iovec> many(1025, iovec{req.data(), 1});
  EXPECT_FALSE(port->send(0, many));
  EXPECT_FALSE(port->send(0, {}));
  EXPECT_EQ(port->stats(0).tx_drops, 4u);
  EXPECT_FALSE(port->send(9, {}));  // no such pair

  ASSERT_TRUE(send_frame(*port, 0, req));
  EXPECT_FALSE(recv_matching(*port, is_echo_reply).empty());
  EXPECT_EQ(port->stats(0).tx_frames, 1u);
}

TEST_F(TapPortTest, NameTooLongIsOneClearError) {
  auto port = TapPort::open("vk-0123456789abc", 1);  // 16 characters
  ASSERT_FALSE(port);
  EXPECT_EQ(port.error().code, Errc::invalid_argument);
  EXPECT_NE(port.error().message().find("longer than 15"), std::string::npos)
      << port.error().message();
  EXPECT_TRUE(TapPort::open("vk-0123456789ab", 1));  // 15 is fine
}

TEST_F(TapPortTest, ExistingNonTapInterfaceIsOneClearError) {
  ASSERT_TRUE(sh("ip link add vkd0 type bridge"));  // this kernel has no dummy driver
  auto port = TapPort::open("vkd0", 1);
  ASSERT_FALSE(port);
  EXPECT_NE(port.error().message().find("not a TAP (driver bridge)"), std::string::npos)
      << port.error().message();
  EXPECT_TRUE(iface_exists("vkd0"));

  ASSERT_TRUE(sh("ip link add vkv0 type veth peer name vkv1"));
  port = TapPort::open("vkv0", 1);
  ASSERT_FALSE(port);
  EXPECT_NE(port.error().message().find("not a TAP (driver veth)"), std::string::npos)
      << port.error().message();

  ASSERT_TRUE(sh("ip tuntap add vkt0 mode tun"));
  port = TapPort::open("vkt0", 1);
  ASSERT_FALSE(port);
  EXPECT_NE(port.error().message().find("TUN (layer 3)"), std::string::npos)
      << port.error().message();
}

TEST_F(TapPortTest, SecondAttachToASingleQueueTapIsBusy) {
  auto first = TapPort::open("vk0", 1);
  ASSERT_TRUE(first);
  auto second = TapPort::open("vk0", 1);
  ASSERT_FALSE(second);
  EXPECT_EQ(second.error().sys_errno, EBUSY);
  EXPECT_NE(second.error().message().find("is another process attached"), std::string::npos)
      << second.error().message();
}

TEST_F(TapPortTest, AttachesToAPersistentTapAndLeavesItBehind) {
  ASSERT_TRUE(sh("ip tuntap add vkp0 mode tap"));
  ASSERT_TRUE(sh("ip tuntap add vkm0 mode tap multi_queue"));
  {
    auto port = TapPort::open("vkp0", 1);
    ASSERT_TRUE(port) << port.error().message();
    EXPECT_FALSE((*port)->created_interface());
    // A multi-queue TAP made elsewhere serves one pair too.
    auto mq = TapPort::open("vkm0", 1);
    ASSERT_TRUE(mq) << mq.error().message();
    auto mq2 = TapPort::open("vkm0", 2);
    ASSERT_TRUE(mq2) << mq2.error().message();
    // A single-queue one cannot serve two pairs.
    auto sq = TapPort::open("vkp0", 2);
    ASSERT_FALSE(sq);
    EXPECT_NE(sq.error().message().find("multi-queue"), std::string::npos) << sq.error().message();
  }
  EXPECT_TRUE(iface_exists("vkp0"));
  EXPECT_TRUE(iface_exists("vkm0"));
}

TEST_F(TapPortTest, MissingDevNetTunIsOneClearError) {
  // Our private mount namespace lets us hide /dev/net from this process only.
  ASSERT_EQ(::mount("tmpfs", "/dev/net", "tmpfs", 0, nullptr), 0);
  auto port = TapPort::open("vk0", 1);
  ASSERT_FALSE(port);
  EXPECT_NE(port.error().message().find("/dev/net/tun is missing"), std::string::npos)
      << port.error().message();
}

TEST_F(TapPortTest, WithoutCapNetAdminCreatingIsOneClearError) {
  // Drop every effective capability of this (test-only) process.
  __user_cap_header_struct hdr{_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct data[2]{};
  ASSERT_EQ(::syscall(SYS_capget, &hdr, data), 0);
  data[0].effective = data[1].effective = 0;
  ASSERT_EQ(::syscall(SYS_capset, &hdr, data), 0);
  auto port = TapPort::open("vk0", 1);
  ASSERT_FALSE(port);
  EXPECT_EQ(port.error().sys_errno, EPERM);
  EXPECT_NE(port.error().message().find("CAP_NET_ADMIN"), std::string::npos)
      << port.error().message();
}

TEST_F(TapPortTest, BadQueuePairCountsAreRefused) {
  EXPECT_FALSE(TapPort::open("vk0", 0));
  EXPECT_FALSE(TapPort::open("vk0", 257));
  EXPECT_FALSE(iface_exists("vk0"));
}

}  // namespace
}  // namespace vhostkit::net
