#include "vhostkit/net/af_packet_port.h"

#include <arpa/inet.h>
#include <fmt/format.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <net/if.h>
#include <netinet/in.h>
#include <spdlog/spdlog.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>

#include "vhostkit/virtq/iov.h"

namespace vhostkit::net {
namespace {

// With TPACKET_V2 and no PACKET_TX_HAS_OFF, the kernel reads a tx frame right after the
// aligned header (TPACKET2_HDRLEN minus the sockaddr_ll it reserves for rx).
constexpr std::size_t kTxDataOffset = TPACKET_ALIGN(sizeof(tpacket2_hdr));
constexpr std::size_t kEthHdrLen = 14;
constexpr std::size_t kVlanTagLen = 4;
constexpr std::size_t kMacAddrsLen = 12;

tpacket2_hdr* slot(std::uint8_t* base, std::uint32_t index, std::uint32_t frame_size) noexcept {
  return reinterpret_cast<tpacket2_hdr*>(base + std::size_t{index} * frame_size);
}

std::uint32_t load_status(tpacket2_hdr* h) noexcept {
  // Acquire: what the kernel wrote into the slot before it set tp_status is visible after.
  return std::atomic_ref<std::uint32_t>(h->tp_status).load(std::memory_order_acquire);
}

void store_status(tpacket2_hdr* h, std::uint32_t status) noexcept {
  // Release: our reads (rx) or writes (tx) of the slot complete before the kernel takes it.
  std::atomic_ref<std::uint32_t>(h->tp_status).store(status, std::memory_order_release);
}

// Ring geometry: frames never straddle a block, blocks are whole pages.
struct Geometry {
  std::uint32_t block_size;
  std::uint32_t block_nr;
  std::uint32_t frame_nr;
};

Geometry geometry(std::uint32_t frame_size, std::uint32_t frames) {
  auto page = static_cast<std::uint32_t>(::sysconf(_SC_PAGESIZE));
  std::uint32_t block = std::max(frame_size, page * 8);
  std::uint32_t per_block = block / frame_size;
  std::uint32_t blocks = (std::max(frames, 1u) + per_block - 1) / per_block;
  return {block, blocks, blocks * per_block};
}

std::uint32_t sum16(const std::uint8_t* p, std::size_t len, std::uint32_t sum) noexcept {
  for (std::size_t i = 0; i + 1 < len; i += 2)
    sum += static_cast<std::uint32_t>(p[i] << 8 | p[i + 1]);
  if (len & 1) sum += static_cast<std::uint32_t>(p[len - 1] << 8);
  return sum;
}

std::uint16_t be16(const std::uint8_t* p) noexcept {
  return static_cast<std::uint16_t>(p[0] << 8 | p[1]);
}

// A frame the host stack sent with CHECKSUM_PARTIAL (TP_STATUS_CSUMNOTREADY) carries only the
// pseudo-header sum in its TCP/UDP checksum field; hardware would have finished it. A plain
// frame has no virtio_net_hdr to say NEEDS_CSUM, so finish it here or the guest drops it.
// Anything other than unfragmented TCP/UDP over IPv4/IPv6 (no extension headers) is left as is.
void complete_checksum(std::uint8_t* f, std::size_t len) noexcept {
  std::size_t off = kEthHdrLen;
  if (len < off) return;
  std::uint16_t type = be16(f + 12);
  while ((type == ETH_P_8021Q || type == ETH_P_8021AD) && len >= off + kVlanTagLen) {
    type = be16(f + off + 2);
    off += kVlanTagLen;
  }
  std::uint8_t proto = 0;
  std::size_t l4 = 0, end = 0;
  if (type == ETH_P_IP && len >= off + 20) {
    std::size_t ihl = std::size_t{f[off] & 0x0fu} * 4;
    if (ihl < 20 || (be16(f + off + 6) & 0x3fff) != 0) return;  // options too short, or a fragment
    proto = f[off + 9];
    l4 = off + ihl;
    end = off + be16(f + off + 2);
  } else if (type == ETH_P_IPV6 && len >= off + 40) {
    proto = f[off + 6];
    l4 = off + 40;
    end = l4 + be16(f + off + 4);
  } else {
    return;
  }
  std::size_t field = proto == IPPROTO_TCP ? 16 : proto == IPPROTO_UDP ? 6 : 0;
  if (field == 0 || end > len || l4 + field + 2 > end) return;  // padding past `end` stays out
  std::uint32_t sum = sum16(f + l4, end - l4, 0);
  while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
  auto csum = static_cast<std::uint16_t>(~sum);
  if (csum == 0 && proto == IPPROTO_UDP) csum = 0xffff;  // 0 means "no checksum" for UDP
  f[l4 + field] = static_cast<std::uint8_t>(csum >> 8);
  f[l4 + field + 1] = static_cast<std::uint8_t>(csum);
}

Result<> set_int_opt(int fd, int opt, int value, const char* what, const std::string& ifname) {
  if (::setsockopt(fd, SOL_PACKET, opt, &value, sizeof value) != 0)
    return fail_errno(fmt::format("af-packet {}: setsockopt({})", ifname, what));
  return {};
}

}  // namespace

AfPacketPort::Pair::~Pair() {
  if (map != nullptr) ::munmap(map, map_len);
}

AfPacketPort::AfPacketPort(std::string ifname, std::uint16_t queue_pairs,
                           const AfPacketOptions& options)
    : ifname_(std::move(ifname)),
      queue_pairs_(queue_pairs),
      options_(options),
      pairs_(std::make_unique<Pair[]>(queue_pairs)) {}

AfPacketPort::~AfPacketPort() = default;

Result<std::unique_ptr<AfPacketPort>> AfPacketPort::open(std::string ifname,
                                                         std::uint16_t queue_pairs,
                                                         AfPacketOptions options) {
  if (queue_pairs == 0 || queue_pairs > 256)
    return fail(Errc::invalid_argument,
                fmt::format("af-packet {}: {} queue pairs (1..256)", ifname, queue_pairs));
  if (ifname.empty() || ifname.size() >= IFNAMSIZ || ifname.find('\0') != std::string::npos)
    return fail(Errc::invalid_argument,
                fmt::format("af-packet {}: not a valid interface name", ifname));
  std::uint32_t fs = options.frame_size;
  if (fs < 256 || fs > (1u << 16) || (fs & (fs - 1)) != 0)
    return fail(
        Errc::invalid_argument,
        fmt::format("af-packet {}: frame_size {} is not a power of two in 256..65536", ifname, fs));
  if (options.rx_frames == 0 || options.tx_frames == 0 || options.rx_frames > (1u << 20) ||
      options.tx_frames > (1u << 20))
    return fail(Errc::invalid_argument,
                fmt::format("af-packet {}: ring sizes {}/{} outside 1..2^20", ifname,
                            options.rx_frames, options.tx_frames));

  int ifindex = static_cast<int>(::if_nametoindex(ifname.c_str()));
  if (ifindex == 0) {
    if (errno == ENODEV || errno == ENXIO)
      return fail(Errc::invalid_argument, fmt::format("af-packet {}: no such interface", ifname));
    return fail_errno(fmt::format("af-packet {}: looking up the interface", ifname));
  }

  std::unique_ptr<AfPacketPort> port(new AfPacketPort(ifname, queue_pairs, options));
  {
    UniqueFd s(::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
    ifreq ifr{};
    std::memcpy(ifr.ifr_name, ifname.data(), ifname.size());
    if (!s || ::ioctl(s.get(), SIOCGIFMTU, &ifr) != 0)
      return fail_errno(fmt::format("af-packet {}: SIOCGIFMTU", ifname));
    port->mtu_ = static_cast<unsigned>(ifr.ifr_mtu);
  }
  port->max_tx_frame_ =
      std::min<std::size_t>(port->mtu_ + kEthHdrLen + kVlanTagLen, fs - kTxDataOffset);

  int fanout_id = -1;
  for (std::uint16_t qp = 0; qp < queue_pairs; ++qp) {
    if (auto r = port->open_pair(port->pairs_[qp], ifindex, fanout_id); !r)
      return std::unexpected(r.error());
    if (queue_pairs > 1 && qp == 0) {
      // The kernel picked a group id no one else uses; the other pairs join it.
      int value = 0;
      socklen_t len = sizeof value;
      if (::getsockopt(port->pairs_[0].fd.get(), SOL_PACKET, PACKET_FANOUT, &value, &len) != 0)
        return fail_errno(fmt::format("af-packet {}: getsockopt(PACKET_FANOUT)", ifname));
      fanout_id = value & 0xffff;
    }
  }
  spdlog::debug("af-packet {}: {} queue pair(s), mtu {}, {}-byte slots", ifname, queue_pairs,
                port->mtu_, fs);
  return port;
}

Result<> AfPacketPort::open_pair(Pair& p, int ifindex, int fanout_id) {
  const std::string& n = ifname_;
  // Protocol 0: nothing is queued to the socket until bind() below, after the rings exist.
  p.fd.reset(::socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!p.fd) {
    int e = errno;
    if (e == EPERM || e == EACCES)
      return fail(Errc::system, fmt::format("af-packet {}: socket(AF_PACKET) needs CAP_NET_RAW", n),
                  e);
    return fail(Errc::system, fmt::format("af-packet {}: socket(AF_PACKET)", n), e);
  }
  int fd = p.fd.get();
  if (auto r = set_int_opt(fd, PACKET_VERSION, TPACKET_V2, "PACKET_VERSION", n); !r) return r;
  // A slot the kernel refuses (bad length) is skipped instead of stalling the tx ring.
  if (auto r = set_int_opt(fd, PACKET_LOSS, 1, "PACKET_LOSS", n); !r) return r;
  // Best effort: both are optimisations that older kernels lack.
  (void)set_int_opt(fd, PACKET_QDISC_BYPASS, 1, "PACKET_QDISC_BYPASS", n);
  if (!set_int_opt(fd, PACKET_IGNORE_OUTGOING, 1, "PACKET_IGNORE_OUTGOING", n))
    spdlog::warn("af-packet {}: no PACKET_IGNORE_OUTGOING; our own tx will show up on rx", n);

  Geometry rx = geometry(options_.frame_size, options_.rx_frames);
  Geometry tx = geometry(options_.frame_size, options_.tx_frames);
  tpacket_req req{rx.block_size, rx.block_nr, options_.frame_size, rx.frame_nr};
  if (::setsockopt(fd, SOL_PACKET, PACKET_RX_RING, &req, sizeof req) != 0)
    return fail_errno(
        fmt::format("af-packet {}: PACKET_RX_RING {} x {}", n, rx.frame_nr, options_.frame_size));
  req = tpacket_req{tx.block_size, tx.block_nr, options_.frame_size, tx.frame_nr};
  if (::setsockopt(fd, SOL_PACKET, PACKET_TX_RING, &req, sizeof req) != 0)
    return fail_errno(
        fmt::format("af-packet {}: PACKET_TX_RING {} x {}", n, tx.frame_nr, options_.frame_size));
  std::size_t rx_len = std::size_t{rx.block_size} * rx.block_nr;
  std::size_t tx_len = std::size_t{tx.block_size} * tx.block_nr;
  // One mapping, rx ring first then tx ring (the layout the kernel defines).
  void* map = ::mmap(nullptr, rx_len + tx_len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (map == MAP_FAILED) return fail_errno(fmt::format("af-packet {}: mmap of the rings", n));
  p.map = map;
  p.map_len = rx_len + tx_len;
  p.rx = Ring{static_cast<std::uint8_t*>(map), rx.frame_nr, 0};
  p.tx = Ring{static_cast<std::uint8_t*>(map) + rx_len, tx.frame_nr, 0};

  sockaddr_ll sll{};
  sll.sll_family = AF_PACKET;
  sll.sll_protocol = htons(ETH_P_ALL);
  sll.sll_ifindex = ifindex;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&sll), sizeof sll) != 0)
    return fail_errno(fmt::format("af-packet {}: bind", n));

  if (options_.promiscuous) {
    // Dropped by the kernel when the socket closes.
    packet_mreq mr{};
    mr.mr_ifindex = ifindex;
    mr.mr_type = PACKET_MR_PROMISC;
    if (::setsockopt(fd, SOL_PACKET, PACKET_ADD_MEMBERSHIP, &mr, sizeof mr) != 0)
      return fail_errno(fmt::format("af-packet {}: promiscuous mode", n));
  }

  if (queue_pairs_ > 1) {
    int value = fanout_id < 0 ? (PACKET_FANOUT_HASH | PACKET_FANOUT_FLAG_UNIQUEID) << 16
                              : (PACKET_FANOUT_HASH << 16) | fanout_id;
    if (::setsockopt(fd, SOL_PACKET, PACKET_FANOUT, &value, sizeof value) != 0) {
      int e = errno;
      return fail(Errc::system,
                  fmt::format("af-packet {}: PACKET_FANOUT{}", n,
                              e == EINVAL ? " (is the interface up?)" : ""),
                  e);
    }
  }
  return {};
}

int AfPacketPort::rx_fd(std::uint16_t qp) const noexcept {
  return qp < queue_pairs_ ? pairs_[qp].fd.get() : -1;
}

void AfPacketPort::kick(Pair& p) noexcept {
  if (p.tx_unkicked == 0) return;
  // The kernel sends every SEND_REQUEST slot from its own head on; on failure the slots stay
  // requested and the next kick retries them.
  if (::sendto(p.fd.get(), nullptr, 0, MSG_DONTWAIT, nullptr, 0) >= 0) p.tx_unkicked = 0;
}

void AfPacketPort::flush(std::uint16_t qp) noexcept {
  if (qp < queue_pairs_) kick(pairs_[qp]);
}

bool AfPacketPort::send(std::uint16_t qp, std::span<const iovec> pieces) noexcept {
  if (qp >= queue_pairs_) return false;
  Pair& p = pairs_[qp];
  const std::uint32_t fs = options_.frame_size;
  std::size_t len = virtq::iov_size(pieces);
  if (len < kEthHdrLen || len > max_tx_frame_) {
    p.counters.tx_drop();
    return false;
  }
  tpacket2_hdr* h = slot(p.tx.base, p.tx.head, fs);
  std::uint32_t status = load_status(h);
  if (status != TP_STATUS_AVAILABLE && status != TP_STATUS_WRONG_FORMAT) {
    // Full: the slots we filled may be waiting for a kick; one kick, then look again.
    kick(p);
    status = load_status(h);
    if (status != TP_STATUS_AVAILABLE && status != TP_STATUS_WRONG_FORMAT) {
      p.counters.tx_drop();
      return false;
    }
  }
  auto* data = reinterpret_cast<std::uint8_t*>(h) + kTxDataOffset;
  virtq::iov_read(pieces, 0, data, len);
  // The kernel accepts the 4 extra bytes only for an 802.1Q-tagged frame.
  bool tagged = data[12] == 0x81 && data[13] == 0x00;
  if (len > mtu_ + kEthHdrLen + (tagged ? kVlanTagLen : 0)) {
    p.counters.tx_drop();
    return false;  // the slot stays ours: nothing was handed over
  }
  h->tp_len = static_cast<std::uint32_t>(len);
  store_status(h, TP_STATUS_SEND_REQUEST);
  p.tx.head = p.tx.head + 1 == p.tx.frames ? 0 : p.tx.head + 1;
  ++p.tx_unkicked;
  p.counters.tx(len);
  return true;
}

std::expected<std::size_t, Errc> AfPacketPort::recv(std::uint16_t qp,
                                                    std::span<const iovec> into) noexcept {
  if (qp >= queue_pairs_) return std::unexpected(Errc::invalid_argument);
  Pair& p = pairs_[qp];
  const std::uint32_t fs = options_.frame_size;
  tpacket2_hdr* h = slot(p.rx.base, p.rx.head, fs);
  std::uint32_t status = load_status(h);
  if ((status & TP_STATUS_USER) == 0) return 0;

  auto give_back = [&] {
    store_status(h, TP_STATUS_KERNEL);
    p.rx.head = p.rx.head + 1 == p.rx.frames ? 0 : p.rx.head + 1;
  };
  std::size_t mac = h->tp_mac;
  std::size_t snap = h->tp_snaplen;
  // The slot is cut at frame_size (snaplen < len); TP_STATUS_COPY would mean the frame went to
  // the socket queue instead. Either way the guest never gets part of a frame.
  if (snap < h->tp_len || (status & TP_STATUS_COPY) != 0 || mac > fs || snap > fs - mac ||
      snap < kMacAddrsLen) {
    if (snap < h->tp_len && !oversize_warned_.exchange(true, std::memory_order_relaxed)) {
      // Once per port: the usual cause is offloads, and nothing else would say so.
      spdlog::warn(
          "af-packet {}: a {}-byte frame does not fit the ring's {}-byte slots and is "
          "dropped (counted as truncated rx). Frames beyond the MTU are GSO/GRO "
          "super-frames: turn off GRO here and TSO/GSO on the sender, e.g. "
          "`ethtool -K {} gro off` and `ethtool -K PEER tso off gso off`",
          ifname_, h->tp_len, fs - mac, ifname_);
    }
    give_back();
    p.counters.rx_truncated();
    return std::unexpected(Errc::too_many);
  }
  std::uint8_t* frame = reinterpret_cast<std::uint8_t*>(h) + mac;
  if (status & TP_STATUS_CSUMNOTREADY) complete_checksum(frame, snap);
  // The receive path moved an 802.1Q/802.1ad tag into tp_vlan_tci: put it back where it was.
  bool vlan = (status & TP_STATUS_VLAN_VALID) != 0;
  std::size_t out_len = snap + (vlan ? kVlanTagLen : 0);
  if (out_len > virtq::iov_size(into)) {
    give_back();
    p.counters.rx_truncated();
    return std::unexpected(Errc::too_many);
  }
  if (vlan) {
    std::uint16_t tpid = (status & TP_STATUS_VLAN_TPID_VALID) ? h->tp_vlan_tpid : ETH_P_8021Q;
    std::uint8_t tag[kVlanTagLen] = {
        static_cast<std::uint8_t>(tpid >> 8), static_cast<std::uint8_t>(tpid),
        static_cast<std::uint8_t>(h->tp_vlan_tci >> 8), static_cast<std::uint8_t>(h->tp_vlan_tci)};
    virtq::IovCursor out(into);
    out.write(frame, kMacAddrsLen);
    out.write(tag, kVlanTagLen);
    out.write(frame + kMacAddrsLen, snap - kMacAddrsLen);
  } else {
    virtq::iov_write(into, 0, frame, snap);
  }
  give_back();
  p.counters.rx(out_len);
  return out_len;
}

PortStats AfPacketPort::stats(std::uint16_t qp) const noexcept {
  return qp < queue_pairs_ ? pairs_[qp].counters.snapshot() : PortStats{};
}

}  // namespace vhostkit::net
