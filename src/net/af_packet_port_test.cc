#include "vhostkit/net/af_packet_port.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <net/if.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <cstring>
#include <set>
#include <vector>

#include "testing/fd_count.h"
#include "testing/netns.h"

namespace vhostkit::net {
namespace {

using namespace testing;
using vhostkit::testing::open_fd_count;

// Mappings of socket memory (a mapped AF_PACKET ring shows as "socket:[inode]").
std::size_t socket_maps_count() { return vhostkit::testing::mapping_count("socket:["); }

constexpr std::uint16_t kTestEthertype = 0x88b5;  // IEEE local experimental: the stack ignores it

// Frame `seq` of `size` bytes: fixed MACs, the test ethertype, then seq and a pattern.
std::vector<std::uint8_t> test_frame(std::uint32_t seq, std::size_t size) {
  std::vector<std::uint8_t> f(size);
  const std::uint8_t hdr[14] = {2, 0, 0, 0, 0, 0xa, 2, 0, 0, 0, 0, 0xb, 0x88, 0xb5};
  std::memcpy(f.data(), hdr, 14);
  std::memcpy(&f[14], &seq, 4);
  for (std::size_t i = 18; i < size; ++i) f[i] = static_cast<std::uint8_t>(seq * 31 + i * 7);
  return f;
}

bool is_test_frame(const std::uint8_t* f, std::size_t n) {
  return n >= 14 && get16(f + 12) == kTestEthertype;
}

// A plain AF_PACKET socket on the far end of the veth: the independent observer.
class Peer {
 public:
  explicit Peer(const std::string& ifname) {
    fd_ = ::socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, htons(ETH_P_ALL));
    int one = 1, rcvbuf = 8 << 20;
    ::setsockopt(fd_, SOL_PACKET, PACKET_IGNORE_OUTGOING, &one, sizeof one);
    ::setsockopt(fd_, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof rcvbuf);
    sockaddr_ll sll{};
    sll.sll_family = AF_PACKET;
    sll.sll_protocol = htons(ETH_P_ALL);
    sll.sll_ifindex = static_cast<int>(::if_nametoindex(ifname.c_str()));
    ok_ = fd_ >= 0 && ::bind(fd_, reinterpret_cast<sockaddr*>(&sll), sizeof sll) == 0;
  }
  ~Peer() { ::close(fd_); }
  bool ok() const { return ok_; }
  bool send(const std::vector<std::uint8_t>& f) {
    return ::send(fd_, f.data(), f.size(), 0) == static_cast<ssize_t>(f.size());
  }
  // The next test frame, or empty after a second of silence.
  std::vector<std::uint8_t> recv() {
    std::vector<std::uint8_t> buf(9000);
    while (wait_readable(fd_, 1000)) {
      ssize_t n = ::recv(fd_, buf.data(), buf.size(), MSG_DONTWAIT);
      if (n > 0 && is_test_frame(buf.data(), static_cast<std::size_t>(n))) {
        buf.resize(static_cast<std::size_t>(n));
        return buf;
      }
    }
    return {};
  }

 private:
  int fd_ = -1;
  bool ok_ = false;
};

// Receives the next test frame from the port on pair `qp` into two iovecs split at `split`.
std::vector<std::uint8_t> port_recv(AfPacketPort& port, std::uint16_t qp, std::size_t split = 100,
                                    std::size_t capacity = 4096) {
  std::vector<std::uint8_t> buf(capacity);
  split = std::min(split, capacity);
  iovec iov[2] = {{buf.data(), split}, {buf.data() + split, capacity - split}};
  for (int tries = 0; tries < 200; ++tries) {
    auto n = port.recv(qp, iov);
    if (!n) return {};
    if (*n == 0) {
      wait_readable(port.rx_fd(qp), 10);
      continue;
    }
    if (is_test_frame(buf.data(), *n)) {
      buf.resize(*n);
      return buf;
    }
  }
  return {};
}

bool port_send(AfPacketPort& port, std::uint16_t qp, std::vector<std::uint8_t>& f,
               std::size_t split = 20) {
  split = std::min(split, f.size());
  iovec iov[2] = {{f.data(), split}, {f.data() + split, f.size() - split}};
  return port.send(qp, iov);
}

class AfPacketPortTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!enter_private_netns()) GTEST_SKIP() << "needs root to create a network namespace";
    ASSERT_TRUE(sh("ip link add vk-a type veth peer name vk-b"));
    ASSERT_TRUE(sh("ip link set vk-a up && ip link set vk-b up"));
  }
};

std::size_t size_for(std::uint32_t i) { return 60 + (i * 7919u) % (1514 - 60 + 1); }

TEST_F(AfPacketPortTest, ThousandFramesEachWayArriveByteExact) {
  auto port = AfPacketPort::open("vk-a", 1);
  ASSERT_TRUE(port) << port.error().message();
  AfPacketPort& p = **port;
  EXPECT_EQ(p.kind(), "af-packet");
  EXPECT_FALSE(p.vnet_hdr());
  EXPECT_EQ(p.mtu(), 1500u);
  Peer peer("vk-b");
  ASSERT_TRUE(peer.ok());

  std::size_t bytes = 0;
  for (std::uint32_t base = 0; base < 1000; base += 32) {
    std::vector<std::vector<std::uint8_t>> burst;
    for (std::uint32_t i = base; i < std::min(base + 32, 1000u); ++i) {
      burst.push_back(test_frame(i, size_for(i)));
      ASSERT_TRUE(port_send(p, 0, burst.back(), i % 40)) << "frame " << i;
      bytes += burst.back().size();
    }
    p.flush(0);
    for (auto& want : burst) {
      auto got = peer.recv();
      ASSERT_EQ(got, want) << "frame " << get16(&want[14]);
    }
  }
  EXPECT_EQ(p.stats(0).tx_frames, 1000u);
  EXPECT_EQ(p.stats(0).tx_bytes, bytes);
  EXPECT_EQ(p.stats(0).tx_drops, 0u);

  bytes = 0;
  for (std::uint32_t base = 0; base < 1000; base += 32) {
    std::vector<std::vector<std::uint8_t>> burst;
    for (std::uint32_t i = base; i < std::min(base + 32, 1000u); ++i) {
      burst.push_back(test_frame(5000 + i, size_for(i + 3)));
      ASSERT_TRUE(peer.send(burst.back()));
      bytes += burst.back().size();
    }
    for (auto& want : burst) {
      auto got = port_recv(p, 0, want.size() % 97);
      ASSERT_EQ(got, want);
    }
  }
  EXPECT_EQ(p.stats(0).rx_frames, 1000u);
  EXPECT_EQ(p.stats(0).rx_bytes, bytes);
  EXPECT_EQ(p.stats(0).rx_truncated, 0u);
}

TEST_F(AfPacketPortTest, OversizeTxFramesAreDroppedPerTheMtu) {
  auto port = AfPacketPort::open("vk-a", 1);
  ASSERT_TRUE(port);
  AfPacketPort& p = **port;
  auto b = AfPacketPort::open("vk-b", 1);
  ASSERT_TRUE(b);

  auto f1515 = test_frame(1, 1515);
  auto f1518 = test_frame(2, 1518);
  std::vector<std::uint8_t> runt(13, 0x02);  // less than an Ethernet header
  EXPECT_FALSE(port_send(p, 0, f1515));
  EXPECT_FALSE(port_send(p, 0, f1518));
  EXPECT_FALSE(port_send(p, 0, runt, 5));
  EXPECT_EQ(p.stats(0).tx_drops, 3u);
  EXPECT_EQ(p.stats(0).tx_frames, 0u);

  // 1500 bytes of payload plus an 802.1Q tag is 1518 and fits the MTU; the far port puts the
  // tag the kernel lifted off back in place.
  auto tagged = test_frame(4, 1518);
  const std::uint8_t tag[6] = {0x81, 0x00, 0x00, 0x2a, 0x88, 0xb5};
  std::memcpy(&tagged[12], tag, 6);
  ASSERT_TRUE(port_send(p, 0, tagged));
  p.flush(0);
  std::vector<std::uint8_t> buf(4096);
  iovec iov{buf.data(), buf.size()};
  std::expected<std::size_t, Errc> n = 0;
  for (int i = 0; i < 100 && n && *n == 0; ++i) {
    wait_readable((*b)->rx_fd(0), 10);
    n = (*b)->recv(0, std::span(&iov, 1));
  }
  ASSERT_TRUE(n);
  buf.resize(*n);
  EXPECT_EQ(buf, tagged);
}

TEST_F(AfPacketPortTest, RxFramesLongerThanASlotOrTheBufferAreCountedNotDeliveredCut) {
  ASSERT_TRUE(sh("ip link set vk-a mtu 4000 && ip link set vk-b mtu 4000"));
  auto port = AfPacketPort::open("vk-a", 1);
  ASSERT_TRUE(port);
  AfPacketPort& p = **port;
  Peer peer("vk-b");
  ASSERT_TRUE(peer.ok());

  ASSERT_TRUE(peer.send(test_frame(1, 3000)));  // longer than a 2048-byte slot
  auto small = test_frame(2, 100);
  ASSERT_TRUE(peer.send(small));
  std::vector<std::uint8_t> buf(4096);
  iovec iov{buf.data(), buf.size()};
  ASSERT_TRUE(wait_readable(p.rx_fd(0), 1000));
  auto n = p.recv(0, std::span(&iov, 1));
  ASSERT_FALSE(n);
  EXPECT_EQ(n.error(), Errc::too_many);
  EXPECT_EQ(p.stats(0).rx_truncated, 1u);
  EXPECT_EQ(port_recv(p, 0), small);

  // A slot that fits but a guest buffer that does not.
  ASSERT_TRUE(peer.send(test_frame(3, 1000)));
  ASSERT_TRUE(wait_readable(p.rx_fd(0), 1000));
  iovec short_iov{buf.data(), 999};
  n = p.recv(0, std::span(&short_iov, 1));
  ASSERT_FALSE(n);
  EXPECT_EQ(n.error(), Errc::too_many);
  EXPECT_EQ(p.stats(0).rx_truncated, 2u);
  EXPECT_EQ(p.stats(0).rx_frames, 1u);

  // tx: the MTU would allow 4014 bytes, a slot only 2016.
  EXPECT_EQ(p.max_tx_frame(), 2048u - 32u);
  auto too_big = test_frame(4, 2017);
  EXPECT_FALSE(port_send(p, 0, too_big));
  auto just_fits = test_frame(5, 2016);
  ASSERT_TRUE(port_send(p, 0, just_fits));
  p.flush(0);
  EXPECT_EQ(peer.recv(), just_fits);
}

TEST_F(AfPacketPortTest, FullTxRingKicksTheKernelItself) {
  AfPacketOptions small;
  small.tx_frames = 64;
  auto port = AfPacketPort::open("vk-a", 1, small);
  ASSERT_TRUE(port);
  Peer peer("vk-b");
  ASSERT_TRUE(peer.ok());
  // Five rings' worth without a flush: send() kicks when it finds the ring full.
  std::vector<std::vector<std::uint8_t>> sent;
  for (std::uint32_t i = 0; i < 320; ++i) {
    sent.push_back(test_frame(i, 64));
    ASSERT_TRUE(port_send(**port, 0, sent.back())) << i;
  }
  (*port)->flush(0);
  for (auto& want : sent) ASSERT_EQ(peer.recv(), want);
}

TEST_F(AfPacketPortTest, TwoQueuePairsShareReceivedFlowsThroughFanout) {
  auto port = AfPacketPort::open("vk-a", 2);
  ASSERT_TRUE(port) << port.error().message();
  AfPacketPort& p = **port;
  ASSERT_NE(p.rx_fd(0), p.rx_fd(1));
  Peer peer("vk-b");
  ASSERT_TRUE(peer.ok());

  // 200 UDP flows (IPv4, distinct source ports) so the flow hash has something to spread.
  const std::uint8_t dst_mac[6] = {2, 0, 0, 0, 0, 0xa}, src_mac[6] = {2, 0, 0, 0, 0, 0xb};
  const std::uint8_t src_ip[4] = {192, 0, 2, 2}, dst_ip[4] = {192, 0, 2, 1};
  constexpr int kFlows = 200;
  for (int i = 0; i < kFlows; ++i) {
    auto f = eth_ipv4(dst_mac, src_mac, src_ip, dst_ip, IPPROTO_UDP, 8 + 10);
    put16(&f[34], static_cast<std::uint16_t>(10000 + i));
    put16(&f[36], 9);
    put16(&f[38], 18);
    ASSERT_TRUE(peer.send(f));
  }
  std::set<std::uint16_t> ports;
  std::uint64_t per_pair[2] = {0, 0};
  std::vector<std::uint8_t> buf(2048);
  iovec iov{buf.data(), buf.size()};
  for (int idle = 0; idle < 50 && ports.size() < kFlows;) {
    bool any = false;
    for (std::uint16_t qp = 0; qp < 2; ++qp) {
      auto n = p.recv(qp, std::span(&iov, 1));
      ASSERT_TRUE(n);
      if (*n == 0 || get16(&buf[12]) != 0x0800 || buf[23] != IPPROTO_UDP) continue;
      any = true;
      ports.insert(get16(&buf[34]));
      ++per_pair[qp];
    }
    if (!any) {
      ++idle;
      ::poll(nullptr, 0, 10);
    }
  }
  EXPECT_EQ(ports.size(), std::size_t{kFlows});
  EXPECT_GT(per_pair[0], 0u);
  EXPECT_GT(per_pair[1], 0u);
  EXPECT_EQ(p.stats(0).rx_frames + p.stats(1).rx_frames, std::uint64_t{kFlows});
}

// Whether the TCP/UDP checksum of an Ethernet/IPv4 frame verifies (pseudo-header included).
bool l4_checksum_ok(const std::vector<std::uint8_t>& f) {
  const std::uint8_t* ip = &f[14];
  std::size_t ihl = (ip[0] & 0xfu) * 4u;
  std::size_t l4_len = get16(ip + 2) - ihl;
  std::uint32_t pseudo = get16(ip + 12) + get16(ip + 14) + get16(ip + 16) + get16(ip + 18) + ip[9] +
                         static_cast<std::uint32_t>(l4_len);
  return inet_checksum(ip + ihl, l4_len, pseudo) == 0;
}

TEST_F(AfPacketPortTest, ChecksumsTheHostLeftToHardwareAreCompleted) {
  ASSERT_TRUE(sh("ip addr add 192.0.2.2/24 dev vk-b"));
  ASSERT_TRUE(sh("ip neigh add 192.0.2.1 lladdr 02:00:00:00:00:0a dev vk-b"));
  ASSERT_TRUE(sh("ethtool -K vk-b tx on"));
  auto port = AfPacketPort::open("vk-a", 1);
  ASSERT_TRUE(port);
  // A witness socket with PACKET_AUXDATA shows the kernel really hands these over unfinished.
  int witness = ::socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, htons(ETH_P_IP));
  ASSERT_GE(witness, 0);
  int one = 1;
  ASSERT_EQ(::setsockopt(witness, SOL_PACKET, PACKET_AUXDATA, &one, sizeof one), 0);
  sockaddr_ll sll{};
  sll.sll_family = AF_PACKET;
  sll.sll_protocol = htons(ETH_P_IP);
  sll.sll_ifindex = static_cast<int>(::if_nametoindex("vk-a"));
  ASSERT_EQ(::bind(witness, reinterpret_cast<sockaddr*>(&sll), sizeof sll), 0);

  // UDP (odd length, to exercise the odd byte) and a TCP SYN, both from the host stack on vk-b.
  int udp = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  sockaddr_in to{};
  to.sin_family = AF_INET;
  to.sin_port = htons(9);
  to.sin_addr.s_addr = htonl(0xc0000201);
  std::vector<std::uint8_t> payload(101, 0x5a);
  ASSERT_EQ(
      ::sendto(udp, payload.data(), payload.size(), 0, reinterpret_cast<sockaddr*>(&to), sizeof to),
      101);
  int tcp = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  to.sin_port = htons(80);
  ::connect(tcp, reinterpret_cast<sockaddr*>(&to), sizeof to);

  std::vector<std::uint8_t> buf(2048);
  alignas(8) char control[256];
  iovec wiov{buf.data(), buf.size()};
  msghdr msg{};
  msg.msg_iov = &wiov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  ASSERT_TRUE(wait_readable(witness, 1000));
  ASSERT_GT(::recvmsg(witness, &msg, 0), 0);
  cmsghdr* c = CMSG_FIRSTHDR(&msg);
  ASSERT_TRUE(c && c->cmsg_type == PACKET_AUXDATA);
  tpacket_auxdata aux;
  std::memcpy(&aux, CMSG_DATA(c), sizeof aux);
  EXPECT_TRUE(aux.tp_status & TP_STATUS_CSUMNOTREADY) << "the path under test was not taken";

  bool saw_udp = false, saw_tcp = false;
  iovec iov{buf.data(), buf.size()};
  for (int i = 0; i < 200 && !(saw_udp && saw_tcp); ++i) {
    auto n = (*port)->recv(0, std::span(&iov, 1));
    ASSERT_TRUE(n);
    if (*n == 0) {
      wait_readable((*port)->rx_fd(0), 10);
      continue;
    }
    std::vector<std::uint8_t> f(buf.begin(), buf.begin() + static_cast<long>(*n));
    if (f.size() < 34 || get16(&f[12]) != 0x0800) continue;
    if (f[23] == IPPROTO_UDP) {
      saw_udp = true;
      EXPECT_TRUE(l4_checksum_ok(f)) << "UDP";
    } else if (f[23] == IPPROTO_TCP) {
      saw_tcp = true;
      EXPECT_TRUE(l4_checksum_ok(f)) << "TCP";
    }
  }
  EXPECT_TRUE(saw_udp);
  EXPECT_TRUE(saw_tcp);
  ::close(udp);
  ::close(tcp);
  ::close(witness);
}

TEST_F(AfPacketPortTest, MissingInterfaceIsOneClearError) {
  auto port = AfPacketPort::open("eth9", 1);
  ASSERT_FALSE(port);
  EXPECT_EQ(port.error().code, Errc::invalid_argument);
  EXPECT_NE(port.error().message().find("af-packet eth9: no such interface"), std::string::npos)
      << port.error().message();
  EXPECT_FALSE(AfPacketPort::open("vk-0123456789abcdef", 1));
  EXPECT_FALSE(AfPacketPort::open("vk-a", 0));
  AfPacketOptions odd;
  odd.frame_size = 3000;
  EXPECT_FALSE(AfPacketPort::open("vk-a", 1, odd));
}

TEST_F(AfPacketPortTest, DestroyClosesSocketsAndUnmapsRings) {
  std::size_t fds = open_fd_count();
  std::size_t maps = socket_maps_count();
  {
    auto port = AfPacketPort::open("vk-a", 2);
    ASSERT_TRUE(port) << port.error().message();
    EXPECT_EQ(open_fd_count(), fds + 2);
    EXPECT_EQ(socket_maps_count(), maps + 2);  // one mapping (rx + tx ring) per pair
    // Promiscuous while open (PACKET_MR_PROMISC), per the kernel's promiscuity count.
    EXPECT_TRUE(std::stoul(read_sys("/sys/class/net/vk-a/flags"), nullptr, 16) & 0x100);
  }
  EXPECT_EQ(open_fd_count(), fds);
  EXPECT_EQ(socket_maps_count(), maps);
  EXPECT_FALSE(std::stoul(read_sys("/sys/class/net/vk-a/flags"), nullptr, 16) & 0x100);
}

TEST_F(AfPacketPortTest, EmptyRingReturnsZeroAndBadPairsAreRefused) {
  auto port = AfPacketPort::open("vk-a", 1);
  ASSERT_TRUE(port);
  std::vector<std::uint8_t> buf(2048);
  iovec iov{buf.data(), buf.size()};
  auto n = (*port)->recv(0, std::span(&iov, 1));
  ASSERT_TRUE(n);
  EXPECT_EQ(*n, 0u);
  EXPECT_FALSE((*port)->recv(1, std::span(&iov, 1)));
  EXPECT_FALSE((*port)->send(1, std::span(&iov, 1)));
  EXPECT_EQ((*port)->rx_fd(1), -1);
  (*port)->flush(1);  // harmless
}

}  // namespace
}  // namespace vhostkit::net
