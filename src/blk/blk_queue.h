// Per-queue data-path state of the virtio-blk device: the queue's io_uring (whose fd the worker
// watches for completions) and a fixed pool of request slots (each with the iovec array its chain
// is popped into and the data pieces parse_blk_request picks out of it, which are the readv/writev
// vector handed to the kernel: no copy of guest data).
#pragma once

#include <liburing.h>
#include <sys/uio.h>

#include <atomic>
#include <cstdint>
#include <expected>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "vhostkit/blk/blk_device.h"
#include "vhostkit/blk/blk_request.h"
#include "vhostkit/vhost/inflight.h"
#include "vhostkit/vhost/queue.h"
#include "vhostkit/vhost/worker.h"
#include "vhostkit/virtq/split_queue.h"

namespace vhostkit::blk {

// What the device knows about its backing store, shared read-only by every queue.
struct BlkDevice::Backing {
  int fd = -1;           // O_DIRECT when direct
  int buffered_fd = -1;  // always buffered (== fd when !direct)
  bool direct = false;
  bool block_device = false;
  std::uint32_t dio_align = 512;
  bool inline_io = false;  // IoPath::inline_call: no io_uring, every request answered at once
  // BlkOptions::added_latency: each I/O carries a linked timeout of `latency` (read by the kernel
  // when the SQE is submitted).
  bool delayed = false;
  __kernel_timespec latency{};
  const std::string* serial = nullptr;
  // What requests are checked against; discard and write_zeroes follow the negotiated features
  // (set before any ring starts).
  BlkLimits limits;
  // WRITE_ZEROES without unmap uses FALLOC_FL_ZERO_RANGE until the file system refuses it once;
  // then punching a hole (which also reads back as zeros) instead.
  std::atomic<bool> zero_range_unsupported{false};
};

struct Slot {
  // A chain of header + kSegMax data buffers + status, with room for a header split in bytes.
  static constexpr std::size_t kSegs = BlkDevice::kSegMax + 2 + 16;

  std::uint16_t head = 0;
  bool on_buffered = false;  // submitted through the buffered fd
  // Completions still to come: the I/O's, and its timer's when delayed; the I/O's result waits
  // in `res` for the last.
  std::uint8_t cqes_left = 0;
  int res = 0;
  BlkRequest req;     // as parsed; second chances change it
  iovec segs[kSegs];  // the chain as popped
  iovec data[kSegs];  // req.data's pieces: the readv/writev vector, into guest memory
};

// The queue's counters, vhost::Counter like every per-queue statistic: the worker writes them,
// BlkDevice::stats reads them from any thread.
struct Counters {
  vhost::Counter reads, writes, flushes, discards, get_ids;
  vhost::Counter bytes_read, bytes_written;
  vhost::Counter io_errors, bad_requests, no_status, buffered;
  std::atomic<std::uint32_t> inflight{0};  // a level, not a count: stored, not added
};

struct BlkDevice::QueueState {
  Backing* backing = nullptr;

  io_uring ring{};
  bool ring_ok = false;            // the io_uring path is set up (always false on the inline path)
  vhost::Worker::Id watch_id = 0;  // the watch on ring.ring_fd
  std::unique_ptr<Slot[]> slots;
  std::vector<std::uint32_t> free_slots;  // a stack of slot indices
  std::uint32_t inflight = 0;             // slots submitted and not yet completed
  Counters counters;
  // Inflight I/O tracking, while the ring runs with a region (vhost::Queue::inflight): every
  // request is recorded before it starts and as its used entry is pushed; the heads a previous
  // back-end left in flight are resubmitted, in their order, before any new chain is popped.
  vhost::InflightSplitQueue* tracked = nullptr;
  std::vector<std::uint16_t> resubmit;
  std::size_t resubmit_next = 0;

  // Starts (ring, its watch, slot pool) / stops (waits for every request in flight) the queue.
  void start(vhost::Queue& q, vhost::Worker& w);
  // Waits for every request in flight and answers it (stop, and before guest memory changes).
  void drain(vhost::Queue& q);
  void stop(vhost::Queue& q, vhost::Worker& w);

  // Reaps completions and answers their requests (status byte, used element). Returns the
  // number reaped. Does not publish.
  unsigned reap(vhost::Queue& q) noexcept;
  // Pops chains while slots are free, answers the bad and synchronous ones, submits the rest in
  // one batch. Returns the number of chains popped.
  unsigned pop_and_submit(vhost::Queue& q) noexcept;
  template <class Ring>
  unsigned pop_and_submit_on(vhost::Queue& q, Ring& vq) noexcept;
  // The ring has completions (its fd became readable).
  void on_completion(vhost::Queue& q) noexcept;

 private:
  // The next chain: a head to resubmit, else a new one from the avail ring (recorded as in
  // flight); nullopt when there is neither. A bad chain was answered by the queue (and recorded).
  template <class Ring>
  std::optional<std::expected<virtq::Chain, virtq::ChainError>> next_chain(
      Ring& vq, std::span<iovec> segs) noexcept;
  std::optional<std::expected<virtq::Chain, virtq::ChainError>> next_split_chain(
      virtq::DeviceQueue& vq, std::span<iovec> segs) noexcept;
  // push_used, recorded for the inflight region.
  void push_used(vhost::Queue& q, std::uint16_t head, std::uint32_t len) noexcept;
  // Parses one popped chain, then answers a refusal or submits the request. Returns true if an
  // SQE was prepared (the slot is then in flight).
  bool dispatch(vhost::Queue& q, Slot& s, std::uint32_t slot_index,
                const virtq::Chain& chain) noexcept;
  // Carries out a parsed request (s.req): answers it now (GET_ID, an empty transfer, the inline
  // path, a failure to submit) or prepares its SQE and returns true.
  bool submit(vhost::Queue& q, Slot& s, std::uint32_t slot_index) noexcept;
  // Answers a request parse_blk_request refused (or a chain with no status byte: used len 0).
  void refuse(vhost::Queue& q, Slot& s, const BlkRefusal& r) noexcept;
  bool prep(Slot& s, std::uint32_t slot_index) noexcept;
  // The inline path: runs the request's system call(s) now; returns what a CQE would say.
  int run_inline(const Slot& s) noexcept;
  // A failed request that deserves a second try with changed parameters (O_DIRECT refusing the
  // buffers; a file system without ZERO_RANGE): changes s and returns true.
  bool second_chance(Slot& s, int res) noexcept;
  void finish(vhost::Queue& q, Slot& s, std::uint8_t status, std::uint32_t used_len) noexcept;
  // An io_uring completion: a second chance, or the answer.
  void complete(vhost::Queue& q, std::uint32_t slot_index, int res) noexcept;
  // Counts the result and answers the request (status byte, used element).
  void answer(vhost::Queue& q, Slot& s, int res) noexcept;
};

}  // namespace vhostkit::blk
