#include "vhostkit/net/tap_port.h"

#include <fcntl.h>
#include <linux/ethtool.h>
#include <linux/if_tun.h>
#include <linux/sockios.h>
#include <net/if.h>
#include <spdlog/spdlog.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <fmt/format.h>
#include <algorithm>
#include <cerrno>
#include <cstring>

#include "vhostkit/virtio/features.h"
#include "vhostkit/virtq/iov.h"

// The kernel ABI has had these since Linux 6.2; older uapi headers lack them. An older kernel
// refuses them with EINVAL, which set_guest_offloads() handles.
#ifndef TUN_F_USO4
#define TUN_F_USO4 0x20
#endif
#ifndef TUN_F_USO6
#define TUN_F_USO6 0x40
#endif

namespace vhostkit::net {
namespace {

// UIO_MAXIOV: readv/writev refuse more pieces than this.
constexpr std::size_t kMaxIov = 1024;
constexpr unsigned kMaxTapQueues = 256;  // MAX_TAP_QUEUES in drivers/net/tun.c

std::string errno_text(int e) { return std::strerror(e); }

// An AF_INET datagram socket is the handle the SIOC* interface ioctls go through.
Result<UniqueFd> control_socket() {
  UniqueFd s(::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  if (!s) return fail_errno("socket(AF_INET) for interface ioctls");
  return s;
}

struct DriverInfo {
  bool exists = false;
  std::string driver;    // "tun" for TUN and TAP devices
  std::string bus_info;  // "tap" or "tun" for the tun driver
};

// What kind of interface `name` is, if any, in this process's network namespace (ethtool
// driver info works in any namespace, unlike /sys/class/net).
DriverInfo probe_interface(const std::string& name) {
  DriverInfo info;
  if (name.empty()) return info;
  auto s = control_socket();
  if (!s) return info;
  ifreq ifr{};
  std::memcpy(ifr.ifr_name, name.data(), name.size());
  if (::ioctl(s->get(), SIOCGIFINDEX, &ifr) != 0) return info;
  info.exists = true;
  ethtool_drvinfo drv{};
  drv.cmd = ETHTOOL_GDRVINFO;
  ifr.ifr_data = reinterpret_cast<char*>(&drv);
  if (::ioctl(s->get(), SIOCETHTOOL, &ifr) == 0) {
    info.driver.assign(drv.driver, strnlen(drv.driver, sizeof drv.driver));
    info.bus_info.assign(drv.bus_info, strnlen(drv.bus_info, sizeof drv.bus_info));
  }
  return info;
}

Result<UniqueFd> open_tun(const std::string& ifname) {
  UniqueFd fd(::open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC));
  if (fd) return fd;
  int e = errno;
  if (e == ENOENT || e == ENODEV || e == ENXIO)
    return fail(Errc::system,
                fmt::format("tap {}: /dev/net/tun is missing (is the tun module "
                            "loaded?)",
                            ifname),
                e);
  return fail(Errc::system, fmt::format("tap {}: cannot open /dev/net/tun", ifname), e);
}

// TUNSETIFF on `fd`; `ifr` carries the name in and the kernel's chosen name out.
int set_iff(int fd, ifreq& ifr, short flags) {
  ifr.ifr_flags = flags;
  return ::ioctl(fd, TUNSETIFF, &ifr) == 0 ? 0 : errno;
}

std::unexpected<Error> setiff_error(const std::string& ifname, int e, std::uint16_t queue_pairs) {
  std::string hint;
  switch (e) {
    case EBUSY: hint = "is another process attached, or is it not a TAP?"; break;
    case EPERM:
    case EACCES: hint = "needs CAP_NET_ADMIN, or the TAP's owner/group"; break;
    case EINVAL:
      hint = fmt::format(
          "the existing interface is not a TAP, or its multi-queue setting does "
          "not fit {} queue pair(s)",
          queue_pairs);
      break;
    default: break;
  }
  std::string detail = fmt::format("tap {}: TUNSETIFF failed: {}", ifname, errno_text(e));
  if (!hint.empty()) detail += " (" + hint + ")";
  return fail(Errc::system, std::move(detail), e);
}

}  // namespace

TapPort::TapPort(std::string ifname, std::uint16_t queue_pairs, bool created)
    : ifname_(std::move(ifname)),
      queue_pairs_(queue_pairs),
      created_(created),
      pairs_(std::make_unique<Pair[]>(queue_pairs)) {}

TapPort::~TapPort() {
  if (created_)
    spdlog::debug("tap {}: closing; the interface goes away with its last queue", ifname_);
}

Result<std::unique_ptr<TapPort>> TapPort::open(std::string ifname, std::uint16_t queue_pairs) {
  if (queue_pairs == 0 || queue_pairs > kMaxTapQueues)
    return fail(Errc::invalid_argument,
                fmt::format("tap {}: {} queue pairs (1..{})", ifname, queue_pairs, kMaxTapQueues));
  if (ifname.size() >= IFNAMSIZ)
    return fail(
        Errc::invalid_argument,
        fmt::format("tap {}: interface name longer than {} characters", ifname, IFNAMSIZ - 1));
  if (ifname.find('\0') != std::string::npos)
    return fail(Errc::invalid_argument, "tap: interface name contains a NUL byte");

  // Say clearly what is wrong with an existing interface of that name before TUNSETIFF's
  // EINVAL would say it vaguely.
  DriverInfo existing = probe_interface(ifname);
  if (existing.exists && !existing.driver.empty()) {
    if (existing.driver != "tun")
      return fail(Errc::invalid_argument,
                  fmt::format("tap {}: an interface of that name exists and is not a TAP "
                              "(driver {})",
                              ifname, existing.driver));
    if (existing.bus_info == "tun")
      return fail(Errc::invalid_argument,
                  fmt::format("tap {}: an interface of that name exists and is a TUN (layer 3) "
                              "device, not a TAP",
                              ifname));
  }

  short flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
  if (queue_pairs > 1) flags |= IFF_MULTI_QUEUE;

  auto first = open_tun(ifname);
  if (!first) return std::unexpected(first.error());
  ifreq ifr{};
  std::memcpy(ifr.ifr_name, ifname.data(), ifname.size());
  int e = set_iff(first->get(), ifr, flags);
  if (e == EINVAL && existing.exists && queue_pairs == 1) {
    // An existing multi-queue TAP takes one queue only with IFF_MULTI_QUEUE.
    flags |= IFF_MULTI_QUEUE;
    e = set_iff(first->get(), ifr, flags);
  }
  if (e != 0) return setiff_error(ifname, e, queue_pairs);
  // The kernel may have expanded a name template ("vk%d") or picked one for "".
  std::string actual(ifr.ifr_name, strnlen(ifr.ifr_name, IFNAMSIZ));

  int hdr_size = static_cast<int>(kTapVnetHdrSize);
  if (::ioctl(first->get(), TUNSETVNETHDRSZ, &hdr_size) != 0)
    return fail_errno(fmt::format("tap {}: TUNSETVNETHDRSZ {}", actual, hdr_size));

  std::unique_ptr<TapPort> port(new TapPort(actual, queue_pairs, !existing.exists));
  port->pairs_[0].fd = std::move(*first);
  for (std::uint16_t qp = 1; qp < queue_pairs; ++qp) {
    auto fd = open_tun(actual);
    if (!fd) return std::unexpected(fd.error());
    ifreq more{};
    std::memcpy(more.ifr_name, actual.data(), actual.size());
    if (int err = set_iff(fd->get(), more, flags); err != 0)
      return setiff_error(actual, err, queue_pairs);
    port->pairs_[qp].fd = std::move(*fd);
  }
  for (std::uint16_t qp = 0; qp < queue_pairs; ++qp)
    port->pairs_[qp].iov = std::make_unique<iovec[]>(kMaxIov);

  spdlog::debug("tap {}: {} with {} queue pair(s)", actual,
                existing.exists ? "attached" : "created", queue_pairs);
  return port;
}

int TapPort::rx_fd(std::uint16_t qp) const noexcept {
  return qp < queue_pairs_ ? pairs_[qp].fd.get() : -1;
}

unsigned TapPort::tun_offloads_for(std::uint64_t f) noexcept {
  using namespace virtio;
  // Every receive offload rests on the guest accepting partial checksums.
  if (!has(f, net_feature::guest_csum)) return 0;
  unsigned m = TUN_F_CSUM;
  if (has(f, net_feature::guest_tso4)) m |= TUN_F_TSO4;
  if (has(f, net_feature::guest_tso6)) m |= TUN_F_TSO6;
  if ((m & (TUN_F_TSO4 | TUN_F_TSO6)) && has(f, net_feature::guest_ecn)) m |= TUN_F_TSO_ECN;
  if (has(f, net_feature::guest_ufo)) m |= TUN_F_UFO;
  // The TAP has one UDP_L4 segmentation feature and takes USO4 and USO6 only as a pair.
  if (has(f, net_feature::guest_uso4) && has(f, net_feature::guest_uso6))
    m |= TUN_F_USO4 | TUN_F_USO6;
  return m;
}

Result<> TapPort::set_guest_offloads(std::uint64_t negotiated_features) {
  unsigned mask = tun_offloads_for(negotiated_features);
  // Offloads are a property of the device, not of one queue: any fd sets them. An older kernel
  // refuses bits it does not know with EINVAL; fall back without USO, then without UFO.
  const unsigned fallbacks[] = {mask, mask & ~(TUN_F_USO4 | TUN_F_USO6),
                                mask & ~(TUN_F_USO4 | TUN_F_USO6 | TUN_F_UFO)};
  int e = 0;
  for (unsigned m : fallbacks) {
    if (::ioctl(pairs_[0].fd.get(), TUNSETOFFLOAD, static_cast<unsigned long>(m)) == 0) {
      if (m != mask)
        spdlog::warn("tap {}: kernel refused some offloads; using TUN_F mask {:#x} not {:#x}",
                     ifname_, m, mask);
      return {};
    }
    e = errno;
    if (e != EINVAL) break;
  }
  return fail(Errc::system, fmt::format("tap {}: TUNSETOFFLOAD {:#x}", ifname_, mask), e);
}

bool TapPort::send(std::uint16_t qp, std::span<const iovec> pieces) noexcept {
  if (qp >= queue_pairs_) return false;
  Pair& p = pairs_[qp];
  if (pieces.empty() || pieces.size() > kMaxIov) {
    p.counters.tx_drop();
    return false;
  }
  // The vnet header goes through as the first 12 bytes; the kernel validates it (a bad one is
  // EINVAL, which costs this frame only).
  ssize_t n = ::writev(p.fd.get(), pieces.data(), static_cast<int>(pieces.size()));
  if (n < 0) {
    p.counters.tx_drop();
    return false;
  }
  auto sent = static_cast<std::size_t>(n);
  p.counters.tx(sent > kTapVnetHdrSize ? sent - kTapVnetHdrSize : 0);
  return true;
}

std::expected<std::size_t, Errc> TapPort::recv(std::uint16_t qp,
                                               std::span<const iovec> into) noexcept {
  if (qp >= queue_pairs_) return std::unexpected(Errc::invalid_argument);
  Pair& p = pairs_[qp];
  std::size_t count = std::min(into.size(), kMaxIov - 1);
  std::size_t capacity = virtq::iov_size(into.first(count));
  // The kernel drops the frame it dequeued if the header does not fit: refuse before reading.
  if (capacity < kTapVnetHdrSize) return std::unexpected(Errc::invalid_argument);
  std::copy_n(into.begin(), count, p.iov.get());
  p.iov[count] = iovec{&p.tail, 1};
  ssize_t n = ::readv(p.fd.get(), p.iov.get(), static_cast<int>(count + 1));
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return 0;
    return std::unexpected(Errc::system);
  }
  auto got = static_cast<std::size_t>(n);
  if (got > capacity) {
    p.counters.rx_truncated();
    return std::unexpected(Errc::too_many);
  }
  p.counters.rx(got > kTapVnetHdrSize ? got - kTapVnetHdrSize : 0);
  return got;
}

PortStats TapPort::stats(std::uint16_t qp) const noexcept {
  return qp < queue_pairs_ ? pairs_[qp].counters.snapshot() : PortStats{};
}

Result<> TapPort::set_link_up(bool up) {
  auto s = control_socket();
  if (!s) return std::unexpected(s.error());
  ifreq ifr{};
  std::memcpy(ifr.ifr_name, ifname_.data(), ifname_.size());
  if (::ioctl(s->get(), SIOCGIFFLAGS, &ifr) != 0)
    return fail_errno(fmt::format("tap {}: SIOCGIFFLAGS", ifname_));
  if (up)
    ifr.ifr_flags |= IFF_UP;
  else
    ifr.ifr_flags &= ~IFF_UP;
  if (::ioctl(s->get(), SIOCSIFFLAGS, &ifr) != 0)
    return fail_errno(fmt::format("tap {}: SIOCSIFFLAGS {}", ifname_, up ? "up" : "down"));
  return {};
}

Result<> TapPort::set_mtu(unsigned mtu) {
  auto s = control_socket();
  if (!s) return std::unexpected(s.error());
  ifreq ifr{};
  std::memcpy(ifr.ifr_name, ifname_.data(), ifname_.size());
  ifr.ifr_mtu = static_cast<int>(mtu);
  if (::ioctl(s->get(), SIOCSIFMTU, &ifr) != 0)
    return fail_errno(fmt::format("tap {}: SIOCSIFMTU {}", ifname_, mtu));
  return {};
}

}  // namespace vhostkit::net
