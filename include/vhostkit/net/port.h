// A port is where vhostkit-net's frames go to and come from on the host side: a TAP device, an
// AF_PACKET socket on an interface, or (inside the device) a loopback that reflects frames.
// A port serves one or more queue pairs; each pair is used by exactly one worker thread, so a
// port needs no locking between pairs.
#pragma once

#include <sys/uio.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <expected>
#include <span>
#include <string_view>

#include "vhostkit/error.h"

namespace vhostkit::net {

struct PortStats {
  std::uint64_t tx_frames = 0;  // guest -> port
  std::uint64_t tx_bytes = 0;   // frame bytes, virtio_net_hdr not counted (also rx_bytes)
  std::uint64_t tx_drops = 0;   // the port could not take a frame
  std::uint64_t rx_frames = 0;  // port -> guest
  std::uint64_t rx_bytes = 0;
  std::uint64_t rx_truncated = 0;  // a frame larger than the buffers offered
};

// The counters behind PortStats for one queue pair. Each counter has one writer (the pair's
// worker) and may be read by another thread (a stats timer): relaxed atomic loads and stores,
// no read-modify-write, so bumping one costs what a plain increment does.
class PortCounters {
 public:
  void tx(std::size_t bytes) noexcept { bump(tx_frames_), bump(tx_bytes_, bytes); }
  void tx_drop() noexcept { bump(tx_drops_); }
  void rx(std::size_t bytes) noexcept { bump(rx_frames_), bump(rx_bytes_, bytes); }
  void rx_truncated() noexcept { bump(rx_truncated_); }

  PortStats snapshot() const noexcept {
    PortStats s;
    s.tx_frames = tx_frames_.load(std::memory_order_relaxed);
    s.tx_bytes = tx_bytes_.load(std::memory_order_relaxed);
    s.tx_drops = tx_drops_.load(std::memory_order_relaxed);
    s.rx_frames = rx_frames_.load(std::memory_order_relaxed);
    s.rx_bytes = rx_bytes_.load(std::memory_order_relaxed);
    s.rx_truncated = rx_truncated_.load(std::memory_order_relaxed);
    return s;
  }

 private:
  static void bump(std::atomic<std::uint64_t>& c, std::uint64_t by = 1) noexcept {
    c.store(c.load(std::memory_order_relaxed) + by, std::memory_order_relaxed);
  }
  std::atomic<std::uint64_t> tx_frames_{0}, tx_bytes_{0}, tx_drops_{0};
  std::atomic<std::uint64_t> rx_frames_{0}, rx_bytes_{0}, rx_truncated_{0};
};

class Port {
 public:
  virtual ~Port() = default;

  virtual std::string_view kind() const noexcept = 0;  // "tap", "af-packet"
  virtual std::string_view ifname() const noexcept = 0;
  virtual std::uint16_t queue_pairs() const noexcept = 0;

  // Readable when frames wait for queue pair qp (epoll it on the pair's worker).
  virtual int rx_fd(std::uint16_t qp) const noexcept = 0;

  // true: frames cross the port with a 12-byte virtio_net_hdr (num_buffers included) in front,
  // so checksum/GSO offloads pass through untouched. false: plain Ethernet frames.
  virtual bool vnet_hdr() const noexcept = 0;

  // Tells the port which offloads the guest accepts on receive (from the negotiated
  // GUEST_CSUM/GUEST_TSO4/6/ECN/UFO bits): TUNSETOFFLOAD on a TAP. No-op where unsupported.
  virtual Result<> set_guest_offloads(std::uint64_t negotiated_features) {
    (void)negotiated_features;
    return {};
  }

  // Sends one frame made of `pieces` (a tx chain's readable part, header first when
  // vnet_hdr()). false: the port could not take it now (the caller drops and counts it).
  virtual bool send(std::uint16_t qp, std::span<const iovec> pieces) noexcept = 0;
  // Ends a burst of send() calls (a mapped ring kicks the kernel once here).
  virtual void flush(std::uint16_t qp) noexcept { (void)qp; }

  // Receives one frame into `into` (an rx buffer: header space first when vnet_hdr()).
  // Returns the bytes written (header included), 0 when no frame waits, or an error:
  // Errc::too_many when the frame did not fit (it is dropped and counted).
  virtual std::expected<std::size_t, Errc> recv(std::uint16_t qp,
                                                std::span<const iovec> into) noexcept = 0;

  virtual PortStats stats(std::uint16_t qp) const noexcept = 0;
};

}  // namespace vhostkit::net
