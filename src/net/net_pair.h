// Internal to the net module: per-queue-pair data-path state of NetDevice, and the iovec helpers
// the tx, rx and loopback paths share.
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

// A counter written by one worker at a time and read by anyone.
struct Counter {
  std::atomic<std::uint64_t> v{0};
  void add(std::uint64_t n) noexcept {
    if (n != 0) v.fetch_add(n, std::memory_order_relaxed);
  }
  std::uint64_t get() const noexcept { return v.load(std::memory_order_relaxed); }
};

// Copies n bytes from `src` at byte offset `off` into dst. Returns the bytes copied (less than
// n only when src is shorter).
inline std::size_t gather(std::span<const iovec> src, std::size_t off, void* dst,
                          std::size_t n) noexcept {
  auto* out = static_cast<std::uint8_t*>(dst);
  std::size_t done = 0;
  for (const iovec& v : src) {
    if (done == n) break;
    if (off >= v.iov_len) {
      off -= v.iov_len;
      continue;
    }
    const std::size_t k = std::min(v.iov_len - off, n - done);
    std::memcpy(out + done, static_cast<const std::uint8_t*>(v.iov_base) + off, k);
    done += k;
    off = 0;
  }
  return done;
}

// Copies n bytes from src into `dst` at byte offset `off` (a header split across pieces lands
// piecewise). Returns the bytes copied.
inline std::size_t scatter(std::span<const iovec> dst, std::size_t off, const void* src,
                           std::size_t n) noexcept {
  const auto* in = static_cast<const std::uint8_t*>(src);
  std::size_t done = 0;
  for (const iovec& v : dst) {
    if (done == n) break;
    if (off >= v.iov_len) {
      off -= v.iov_len;
      continue;
    }
    const std::size_t k = std::min(v.iov_len - off, n - done);
    std::memcpy(static_cast<std::uint8_t*>(v.iov_base) + off, in + done, k);
    done += k;
    off = 0;
  }
  return done;
}

// The pieces of `src` after its first `off` bytes, into `out` (no data copied). Returns the
// number of pieces; `out` must hold src.size() pieces.
inline std::size_t skip(std::span<const iovec> src, std::size_t off,
                        std::span<iovec> out) noexcept {
  std::size_t n = 0;
  for (const iovec& v : src) {
    if (off >= v.iov_len) {
      off -= v.iov_len;
      continue;
    }
    if (n == out.size()) break;
    out[n++] = iovec{static_cast<std::uint8_t*>(v.iov_base) + off, v.iov_len - off};
    off = 0;
  }
  return n;
}

// A cursor over an iovec list: the source of a frame being copied into rx chains.
struct IovCursor {
  std::span<const iovec> v;
  std::size_t i = 0;    // current piece
  std::size_t off = 0;  // offset inside it

  // Moves past n bytes.
  void advance(std::size_t n) noexcept {
    while (n != 0 && i < v.size()) {
      const std::size_t k = std::min(v[i].iov_len - off, n);
      n -= k;
      off += k;
      if (off == v[i].iov_len) {
        ++i;
        off = 0;
      }
    }
  }
  // Copies up to n bytes into `dst` at offset dst_off; returns bytes copied.
  std::size_t copy_to(std::span<const iovec> dst, std::size_t dst_off, std::size_t n) noexcept {
    std::size_t done = 0;
    std::size_t d = 0;
    while (d < dst.size() && dst_off >= dst[d].iov_len) dst_off -= dst[d++].iov_len;
    while (done < n && d < dst.size() && i < v.size()) {
      const std::size_t sk = v[i].iov_len - off;
      const std::size_t dk = dst[d].iov_len - dst_off;
      const std::size_t k = std::min({sk, dk, n - done});
      std::memcpy(static_cast<std::uint8_t*>(dst[d].iov_base) + dst_off,
                  static_cast<const std::uint8_t*>(v[i].iov_base) + off, k);
      done += k;
      off += k;
      dst_off += k;
      if (off == v[i].iov_len) {
        ++i;
        off = 0;
      }
      if (dst_off == dst[d].iov_len) {
        ++d;
        dst_off = 0;
      }
    }
    return done;
  }
};

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

  detail::Counter tx_frames, tx_bytes, tx_drops, tx_errors;
  detail::Counter rx_frames, rx_bytes, rx_drops, rx_errors;
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
