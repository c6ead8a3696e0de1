// A TAP device as a port: frames cross with the 12-byte virtio_net_hdr in front, so the guest's
// checksum and GSO offloads reach the host kernel untouched (what vhost-net does with a TAP).
// One TAP queue (fd) per queue pair, IFF_MULTI_QUEUE when there is more than one.
#pragma once

#include <sys/uio.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "vhostkit/error.h"
#include "vhostkit/net/port.h"
#include "vhostkit/unique_fd.h"

namespace vhostkit::net {

// The header size we set with TUNSETVNETHDRSZ: virtio_net_hdr with num_buffers (virtio 1.x or
// MRG_RXBUF). The kernel fills the first 10 bytes on receive and leaves num_buffers to us.
inline constexpr std::size_t kTapVnetHdrSize = 12;

// Receive buffers a device should offer so no frame is truncated: a GSO frame when any
// GUEST_TSO/UFO/USO offload is on, otherwise MTU + Ethernet header (+ VLAN tag). A frame that
// does not fit is counted in rx_truncated and reported as Errc::too_many, never delivered cut.
inline constexpr std::size_t kTapMaxGsoFrame = 65535 + 14 + 4;
constexpr std::size_t tap_rx_buffer_size(unsigned mtu, bool gso) {
  return kTapVnetHdrSize + (gso ? kTapMaxGsoFrame : mtu + 14 + 4);
}

class TapPort final : public Port {
 public:
  // Opens (creating if missing) the TAP `ifname` with one queue per pair. An interface we
  // create is not persistent: it disappears when the port is destroyed.
  static Result<std::unique_ptr<TapPort>> open(std::string ifname, std::uint16_t queue_pairs);

  TapPort(const TapPort&) = delete;
  TapPort& operator=(const TapPort&) = delete;
  ~TapPort() override;

  std::string_view kind() const noexcept override { return "tap"; }
  std::string_view ifname() const noexcept override { return ifname_; }
  std::uint16_t queue_pairs() const noexcept override { return queue_pairs_; }
  int rx_fd(std::uint16_t qp) const noexcept override;
  bool vnet_hdr() const noexcept override { return true; }

  // TUNSETOFFLOAD from the negotiated GUEST_CSUM/TSO4/TSO6/ECN/UFO/USO4/USO6 bits. Offloads
  // without GUEST_CSUM are dropped (the spec makes them depend on it, and so does the kernel).
  Result<> set_guest_offloads(std::uint64_t negotiated_features) override;
  // The TUN_F_* mask set_guest_offloads() would ask for (exposed for tests and logs).
  static unsigned tun_offloads_for(std::uint64_t negotiated_features) noexcept;

  // writev of a tx chain's readable iovecs, vnet header first. false (and a tx drop) when the
  // TAP queue is full (EAGAIN), the frame is malformed, or it has more pieces than UIO_MAXIOV.
  bool send(std::uint16_t qp, std::span<const iovec> pieces) noexcept override;
  // readv into an rx buffer (header space first). A buffer under kTapVnetHdrSize is refused
  // before any frame is taken from the TAP (Errc::invalid_argument).
  std::expected<std::size_t, Errc> recv(std::uint16_t qp,
                                        std::span<const iovec> into) noexcept override;

  PortStats stats(std::uint16_t qp) const noexcept override;

  // true when open() created the interface (it goes away with the port).
  bool created_interface() const noexcept { return created_; }
  int fd(std::uint16_t qp) const noexcept { return rx_fd(qp); }

  // Small control helpers (SIOCSIFFLAGS / SIOCSIFMTU), mostly for tests and the demo.
  Result<> set_link_up(bool up);
  Result<> set_mtu(unsigned mtu);

 private:
  struct alignas(64) Pair {
    UniqueFd fd;
    PortCounters counters;
    // recv appends a one-byte tail after the caller's iovecs: a byte landing there means the
    // frame was larger than the buffer (readv on a TAP truncates silently).
    std::unique_ptr<iovec[]> iov;
    std::uint8_t tail = 0;
  };

  TapPort(std::string ifname, std::uint16_t queue_pairs, bool created);

  std::string ifname_;
  std::uint16_t queue_pairs_;
  bool created_;
  std::unique_ptr<Pair[]> pairs_;
};

}  // namespace vhostkit::net
