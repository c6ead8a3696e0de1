// Internal to the net module: per-queue-pair data-path state of NetDevice, and what the tx, rx
// and loopback paths share.
#pragma once

#include <sys/uio.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <span>

#include "vhostkit/net/net_device.h"
#include "vhostkit/vhost/queue.h"
#include "vhostkit/vhost/worker.h"
#include "vhostkit/virtq/chain.h"
#include "vhostkit/virtq/iov.h"

namespace vhostkit::net {

namespace detail {

// Pieces one chain may translate to (Linux's UIO_MAXIOV); a longer chain is malformed
// (ChainError::too_many_segments).
inline constexpr std::size_t kMaxSegs = 1024;
// Chains one received frame may be spread over with MRG_RXBUF.
inline constexpr std::size_t kMaxMergeChains = 256;
// Host staging for a frame from a port: the largest GSO frame plus slack.
inline constexpr std::size_t kBounceBytes = 65536 + 64;
// Chains one tx burst may pop before delivering any (NetOptions::burst's upper bound).
inline constexpr std::size_t kMaxBurst = NetDevice::kMaxBurst;

// At most one log line per second per limiter: a guest that sends bad chains in a loop must not
// fill the disk.
struct RateLimit {
  std::atomic<std::int64_t> next_ns{0};
  bool allow() noexcept {
    const std::int64_t now = std::chrono::duration_cast<std::chrono::nanoseconds>(
                                 std::chrono::steady_clock::now().time_since_epoch())
                                 .count();
    std::int64_t n = next_ns.load(std::memory_order_relaxed);
    if (now < n) return false;
    return next_ns.compare_exchange_strong(n, now + 1'000'000'000, std::memory_order_relaxed);
  }
};

}  // namespace detail

struct alignas(64) NetDevice::Pair {
  std::uint16_t qp = 0;
  // Set on the queue's worker in queue_started, cleared in queue_stopped. The tx worker reads
  // the rx side in loopback, so these are atomic; loopback uses them only when both rings of
  // the pair run on the same worker.
  std::atomic<vhost::Queue*> txq{nullptr};
  std::atomic<vhost::Queue*> rxq{nullptr};
  std::atomic<vhost::Worker*> tx_worker{nullptr};
  std::atomic<vhost::Worker*> rx_worker{nullptr};

  // Port rx (rx worker only).
  vhost::PollMode rx_mode = vhost::PollMode::event;
  bool watching = false;  // the port's rx fd is in the worker's epoll set
  vhost::Worker::Id watch_id = 0;
  // The port's rx side failed (e.g. its TAP was deleted): its fd is no longer watched, since a
  // level-triggered fd in error would wake the worker forever. Until the ring restarts.
  bool port_failed = false;
  // Loopback: the last rx header delivered differed from what its buffer held (the driver
  // rewrites the headers of the buffers it posts), so the next ones are asked for for writing.
  bool rx_hdr_rewritten = false;

  // Segment arrays: a tx chain (loopback: a whole burst of them, each popped only while a
  // full chain's worth of room is left, so no chain is refused for lack of room), the rx chain
  // being filled.
  std::array<iovec, 2 * detail::kMaxSegs> tx_segs{};
  std::array<iovec, detail::kMaxSegs> rx_segs{};
  std::array<iovec, detail::kMaxSegs> extra_segs{};  // MRG_RXBUF: the 2nd, 3rd... rx chain
  std::array<iovec, detail::kMaxSegs + 1> io{};      // what we hand the port; loopback source
  std::array<std::uint16_t, detail::kMaxMergeChains> merge_head{};
  std::array<std::uint32_t, detail::kMaxMergeChains> merge_len{};
  std::array<std::uint8_t, 16> hdr_scratch{};
  std::array<virtq::Chain, detail::kMaxBurst> tx_batch{};  // loopback: the burst popped
  std::unique_ptr<std::uint8_t[]> bounce;                  // kBounceBytes, port rx staging

  // The pair's counters, since the device was made (NetDevice::stats). tx_* are written by the
  // transmitq's worker, rx_* by the receiveq's (which in loopback is the same one).
  vhost::Counter tx_frames, tx_bytes, tx_drops, tx_errors;
  vhost::Counter rx_frames, rx_bytes, rx_drops, rx_errors;
  detail::RateLimit log_limit;
};

}  // namespace vhostkit::net

namespace vhostkit::net::detail {

enum class Delivery : std::uint8_t {
  delivered,  // the frame is in the guest's rx chains (used entries pushed, not published)
  no_buffer,  // the rx ring had no usable chain: nothing consumed
  dropped,    // did not fit (too big without MRG_RXBUF, or the ring ran out mid-frame)
};

// The first 10 bytes of a virtio-net header that asks for nothing (no checksum or segmentation
// offload): what a frame from a port without a vnet header, or from the loopback, carries.
inline constexpr std::uint8_t kPlainHdr10[10] = {};

// The receive ring's layout, as negotiated (NetDevice::set_features).
struct RxFormat {
  std::size_t hdr_len = 12;  // virtio-net header bytes in front of each frame: 10 or 12
  bool mrg_rxbuf = false;    // a frame may spread over several chains (VIRTIO_NET_F_MRG_RXBUF)
};

// One frame on its way into the guest: `len` bytes found `offset` bytes into `pieces`.
struct FrameSource {
  // flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, as the guest will see them;
  // num_buffers is the device's to write.
  const std::uint8_t* hdr10 = kPlainHdr10;
  std::span<const iovec> pieces;
  std::size_t offset = 0;
  std::size_t len = 0;
  bool swap_mac = false;  // exchange the destination and source addresses on the way (loopback)
};

// What deliver_frame did.
struct RxResult {
  Delivery delivery = Delivery::no_buffer;
  // Used entries were pushed (the frame's, or bad chains answered with len 0): the caller must
  // publish the used index. Also true for no_buffer when malformed chains were consumed.
  bool used_pushed = false;
};

// Writes one frame into the guest's rx ring: the header (hdr10, then num_buffers when the
// header is 12 bytes) followed by the frame. Chains without room for the header are answered
// with used len 0 and counted in rx_errors; a frame that does not fit is counted in rx_drops.
// Delivered frames are the caller's to count. For either layout (instantiated in net_rx.cc).
template <virtq::DeviceRing Ring>
RxResult deliver_frame(NetDevice::Pair& p, Ring& vq, RxFormat fmt, const FrameSource& f) noexcept;

}  // namespace vhostkit::net::detail
