// An AF_PACKET socket on an existing interface as a port, with mapped TPACKET_V2 rx and tx
// rings: frames move through shared memory, and a burst of sends costs one sendto() (flush).
// Plain Ethernet frames (vnet_hdr() is false): the device strips and supplies virtio_net_hdr.
// Several queue pairs: one socket and ring pair each, joined in a PACKET_FANOUT_HASH group so
// the kernel spreads received flows across them.
#pragma once

#include <sys/uio.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "vhostkit/error.h"
#include "vhostkit/net/port.h"
#include "vhostkit/unique_fd.h"

namespace vhostkit::net {

struct AfPacketOptions {
  // Bytes per ring slot, a power of two. A slot holds the TPACKET_V2 header and the frame:
  // 2048 carries 1982-byte frames on rx and 2016 on tx, enough for MTU 1500 (+ VLAN tag).
  // Larger frames are counted (rx_truncated, tx_drops) and never delivered cut.
  std::uint32_t frame_size = 2048;
  std::uint32_t rx_frames = 512;  // rounded up to whole ring blocks
  std::uint32_t tx_frames = 512;
  // The guest has its own MAC: without promiscuous mode a real NIC filters its unicast away.
  bool promiscuous = true;
};

class AfPacketPort final : public Port {
 public:
  // Binds to the existing interface `ifname` (up, when queue_pairs > 1: the kernel joins a
  // fanout group only on a running socket).
  static Result<std::unique_ptr<AfPacketPort>> open(std::string ifname, std::uint16_t queue_pairs,
                                                    AfPacketOptions options = {});

  AfPacketPort(const AfPacketPort&) = delete;
  AfPacketPort& operator=(const AfPacketPort&) = delete;
  ~AfPacketPort() override;

  std::string_view kind() const noexcept override { return "af-packet"; }
  std::string_view ifname() const noexcept override { return ifname_; }
  std::uint16_t queue_pairs() const noexcept override { return queue_pairs_; }
  // The pair's socket: POLLIN when its rx ring holds a frame.
  int rx_fd(std::uint16_t qp) const noexcept override;
  bool vnet_hdr() const noexcept override { return false; }

  // Copies the frame into the next tx ring slot (no syscall; the ring is kicked by flush(), or
  // here once when the ring is full). false (a tx drop): the ring is full even after a kick,
  // or the frame is shorter than an Ethernet header, longer than MTU + 14 (+ 4 with an 802.1Q
  // tag), or longer than a slot.
  bool send(std::uint16_t qp, std::span<const iovec> pieces) noexcept override;
  // One sendto(MSG_DONTWAIT) when send() filled slots since the last kick.
  void flush(std::uint16_t qp) noexcept override;
  // Copies the next ready rx slot into `into` (re-inserting a VLAN tag the kernel took off,
  // finishing a TCP/UDP checksum a local sender left to hardware) and hands the slot back.
  // Errc::too_many (and rx_truncated) when the frame was longer than a slot or than `into`.
  std::expected<std::size_t, Errc> recv(std::uint16_t qp,
                                        std::span<const iovec> into) noexcept override;

  PortStats stats(std::uint16_t qp) const noexcept override;

  unsigned mtu() const noexcept { return mtu_; }  // read once at open
  std::size_t max_tx_frame() const noexcept { return max_tx_frame_; }

 private:
  struct Ring {
    std::uint8_t* base = nullptr;
    std::uint32_t frames = 0;
    std::uint32_t head = 0;  // the next slot we read (rx) or fill (tx)
  };
  struct alignas(64) Pair {
    UniqueFd fd;
    void* map = nullptr;
    std::size_t map_len = 0;
    Ring rx, tx;
    std::uint32_t tx_unkicked = 0;  // slots marked SEND_REQUEST since the last sendto
    PortCounters counters;
    ~Pair();
  };

  AfPacketPort(std::string ifname, std::uint16_t queue_pairs, const AfPacketOptions& options);
  Result<> open_pair(Pair& p, int ifindex, int fanout_id);
  void kick(Pair& p) noexcept;

  std::string ifname_;
  std::uint16_t queue_pairs_;
  AfPacketOptions options_;
  unsigned mtu_ = 1500;
  std::size_t max_tx_frame_ = 0;
  std::unique_ptr<Pair[]> pairs_;
  std::atomic<bool> oversize_warned_{false};  // the "frame beyond the ring's slots" log, once
};

}  // namespace vhostkit::net
