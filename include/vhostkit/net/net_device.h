// The virtio-net device (virtio 1.2, 5.1) as a vhost::DeviceBackend: the vhost-net analogue.
// Queue 2p is pair p's receiveq (host -> guest), 2p+1 its transmitq (guest -> host), as the
// spec numbers them (5.1.2), and the last queue (2 * pairs) the control queue. Frames go to and
// come from a host Port (TAP, AF_PACKET), or, with no port, are reflected from a pair's transmitq
// straight into its own receiveq with the Ethernet addresses swapped (loopback, the benchmark
// target).
//
// Threading: the data path of a queue runs on its vhost worker. Loopback copies from the tx
// ring into the rx ring of the same pair, so both rings of a pair must be served by one worker
// (vhost::DeviceOptions::queues_per_worker even; the default 2 does it). stats(), the control
// state getters and announce() may be called from any thread.
#pragma once

#include <sys/uio.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>

#include "vhostkit/error.h"
#include "vhostkit/net/port.h"
#include "vhostkit/vhost/backend.h"

namespace vhostkit::net {

struct NetOptions {
  std::array<std::uint8_t, 6> mac{0x52, 0x54, 0x00, 0x12, 0x34, 0x56};
  std::uint16_t mtu = 0;          // 0: no VIRTIO_NET_F_MTU
  std::uint16_t queue_pairs = 1;  // 1..kMaxQueuePairs
  std::unique_ptr<Port> port;     // null: loopback
  std::uint16_t burst = 32;       // chains per batch (1..kMaxBurst)
  // Offer VIRTIO_F_RING_PACKED and VIRTIO_F_IN_ORDER (the front-end picks; these refuse them,
  // for comparison). Every handler serves both layouts, with or without IN_ORDER: it answers
  // tx chains in the order it popped them, and an rx frame's chains too.
  bool packed = true;
  bool in_order = true;
};

// A snapshot of one queue pair's counters.
struct NetStats {
  std::uint64_t tx_frames = 0;  // guest -> port (or -> loopback)
  std::uint64_t tx_bytes = 0;   // frame bytes, virtio-net header excluded
  std::uint64_t tx_drops = 0;   // the port refused, or loopback had no rx buffer
  std::uint64_t tx_errors = 0;  // malformed tx chains
  std::uint64_t rx_frames = 0;  // -> guest
  std::uint64_t rx_bytes = 0;
  std::uint64_t rx_drops = 0;   // frames that did not fit the guest's buffers
  std::uint64_t rx_errors = 0;  // malformed rx chains (no room for the header)
};

class NetDevice final : public vhost::DeviceBackend {
 public:
  static constexpr std::uint16_t kMaxQueuePairs = 256;
  static constexpr std::uint16_t kMaxBurst = 256;  // chains one batch may pop
  // The largest frame we move (64 KiB GSO frame): longer tx chains are malformed.
  static constexpr std::size_t kMaxFrame = 65536 + 14 + 4;

  // Clamps out-of-range options (queue_pairs, burst) to the nearest valid value; use create()
  // to have them refused instead.
  explicit NetDevice(NetOptions opts);
  ~NetDevice() override;
  NetDevice(const NetDevice&) = delete;
  NetDevice& operator=(const NetDevice&) = delete;

  // Validates the options (pairs 1..kMaxQueuePairs and no more than the port serves, burst
  // 1..256, mtu 0 or 68..65535) and builds the device.
  static Result<std::unique_ptr<NetDevice>> create(NetOptions opts);

  // vhost::DeviceBackend
  std::uint64_t features() const noexcept override;
  std::uint16_t num_queues() const noexcept override;
  Result<> read_config(std::uint32_t offset, std::span<std::uint8_t> out) const override;
  Result<> write_config(std::uint32_t offset, std::span<const std::uint8_t> data) override;
  void set_features(std::uint64_t acked) noexcept override;
  void queue_started(vhost::Queue& q, vhost::Worker& w) override;
  void queue_stopped(vhost::Queue& q, vhost::Worker& w) override;
  bool handle_queue(vhost::Queue& q) noexcept override;

  // vhost-user SEND_RARP, after a migration to a guest that did not ack GUEST_ANNOUNCE: a
  // gratuitous RARP from `mac` goes out through the port (from pair 0's tx worker), so that the
  // network learns the guest's new place. On the loopback, where the guest is the whole network,
  // it is delivered to pair 0's receiveq as soon as the guest has an rx buffer.
  void announce(const std::uint8_t mac[6]);

  NetStats stats(std::uint16_t qp) const noexcept;
  std::uint16_t queue_pairs() const noexcept { return pairs_count_; }
  bool loopback() const noexcept { return port_ == nullptr; }
  Port* port() const noexcept { return port_.get(); }
  std::size_t hdr_len() const noexcept { return hdr_len_; }

  // Control-queue state (what the driver asked for; we accept and remember it).
  std::uint16_t active_pairs() const noexcept {
    return active_pairs_.load(std::memory_order_relaxed);
  }
  bool promisc() const noexcept { return rx_mode_.load(std::memory_order_relaxed) & 1u; }
  bool allmulti() const noexcept { return rx_mode_.load(std::memory_order_relaxed) & 2u; }
  std::uint8_t rx_mode_bits() const noexcept { return rx_mode_.load(std::memory_order_relaxed); }
  std::array<std::uint8_t, 6> mac() const;
  std::uint64_t ctrl_errors() const noexcept {
    return ctrl_errors_.load(std::memory_order_relaxed);
  }
  std::uint16_t config_status() const noexcept { return status_.load(std::memory_order_relaxed); }

  struct Pair;  // per-pair data-path state (src/net/net_pair.h)

 private:
  bool handle_tx(Pair& p, vhost::Queue& q) noexcept;
  bool handle_rx_kick(Pair& p, vhost::Queue& q) noexcept;
  bool handle_ctrl(vhost::Queue& q) noexcept;
  // The handlers below run on either ring layout (virtq::DeviceRing), chosen once per call.
  template <class Ring>
  bool ctrl_burst(vhost::Queue& q, Ring& vq) noexcept;
  std::uint8_t exec_ctrl(std::uint8_t cls, std::uint8_t cmd, std::span<const iovec> readable,
                         std::uint64_t data_len) noexcept;
  template <class Ring>
  bool tx_burst_port(Pair& p, vhost::Queue& q, Ring& vq) noexcept;
  template <class Ring>
  bool tx_burst_loopback(Pair& p, vhost::Queue& q, Ring& vq) noexcept;
  // Port -> guest until the port is idle, the ring is empty or `budget` frames moved.
  // Returns the frames moved; sets *ring_empty when it stopped for lack of rx buffers.
  std::size_t rx_from_port(Pair& p, vhost::Queue& q, std::size_t budget, bool* ring_empty) noexcept;
  template <class Ring>
  std::size_t rx_from_port_on(Pair& p, vhost::Queue& q, Ring& vq, std::size_t budget,
                              bool* ring_empty) noexcept;
  void on_port_readable(std::uint16_t qp) noexcept;
  bool inject_announce(Pair& p, vhost::Queue& q) noexcept;
  static constexpr std::size_t kRarpLen = 60;
  void rarp_frame(std::uint8_t (&frame)[kRarpLen]);
  void send_announce() noexcept;

  NetOptions opts_;
  std::unique_ptr<Port> port_;
  std::uint16_t pairs_count_ = 1;
  std::uint16_t burst_ = 32;
  std::uint64_t offered_ = 0;
  // Negotiated (set_features runs before any ring starts).
  std::uint64_t acked_ = 0;
  std::size_t hdr_len_ = 12;
  bool mrg_rxbuf_ = false;
  bool ctrl_vq_ = false;

  std::unique_ptr<Pair[]> pairs_;
  std::unique_ptr<iovec[]> ctrl_segs_;

  std::atomic<std::uint16_t> status_{1};  // virtio_net_config.status
  std::atomic<std::uint16_t> active_pairs_{1};
  std::atomic<std::uint8_t> rx_mode_{0};  // bit n: VIRTIO_NET_CTRL_RX command n turned on
  std::atomic<std::uint64_t> ctrl_errors_{0};
  mutable std::mutex mac_mu_;
  std::array<std::uint8_t, 6> ctrl_mac_{};
  std::uint32_t ctrl_mac_table_entries_ = 0;  // under mac_mu_

  // announce(): a frame waiting for pair 0's rx worker.
  std::mutex announce_mu_;
  std::array<std::uint8_t, 6> announce_mac_{};
  std::atomic<bool> announce_pending_{false};
};

}  // namespace vhostkit::net
