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

// Writes one frame into the guest's rx ring: header (the first 10 bytes from hdr10, then
// num_buffers when hdr_len is 12) followed by frame_len bytes read from src after src_off.
// swap_mac exchanges the frame's destination and source addresses on the way (loopback).
// Chains without room for the header are answered with used len 0 and counted in rx_errors.
// `touched` is set when any used entry was pushed (the caller must publish).
Delivery deliver_frame(NetDevice::Pair& p, virtq::DeviceQueue& vq, std::size_t hdr_len,
                       bool mrg_rxbuf, const std::uint8_t* hdr10, std::span<const iovec> src,
                       std::size_t src_off, std::size_t frame_len, bool swap_mac,
                       bool& touched) noexcept;

}  // namespace vhostkit::net::detail
