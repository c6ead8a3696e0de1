// The virtio-blk device (virtio 1.2, 5.2) as a vhost::DeviceBackend, backed by a raw image file
// or block device through io_uring, or by plain calls on the worker when the image is in memory
// (see IoPath).
//
// Requests are parsed and checked in one place (parse_blk_request, blk_request.h), with the
// chain's guest buffers as the readv/writev iovecs (no copy); src/blk/blk_io.cc carries them
// out. On the io_uring path each request queue has its own ring, created when the vring starts
// and owned by the queue's worker; a request is one SQE (two with an added latency: the I/O and a
// linked timer), completions arrive out of order
// (io_uring's own fd is watched by the worker, and the CQ is also reaped on every handle_queue, so
// busy polling needs no wake-up), and FLUSH carries IOSQE_IO_DRAIN so it starts only after every
// earlier request on its queue has completed. On the inline path the worker makes the system call
// and answers the request before popping the next. Either way the status byte is written after the
// data, then the used element is pushed.
//
// queue_stopped waits for every request in flight and answers it before the ring detaches: no
// completion touches guest memory after the ring stops. With an inflight region (vhost-user
// INFLIGHT_SHMFD) each request is recorded there from before it starts until its used entry is
// published, and at ring start the requests a killed predecessor left unanswered are resubmitted
// in their original order before any new one (src/blk/blk_io.cc, next_chain).
//
// Threading: the data path of a queue runs on its worker; stats() may be called from any thread.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "vhostkit/error.h"
#include "vhostkit/unique_fd.h"
#include "vhostkit/vhost/backend.h"

namespace vhostkit::blk {

// How requests reach the backing store.
//   uring   through the queue's io_uring (completions out of order, many in flight)
//   inline  a preadv/pwritev/fdatasync/fallocate call on the queue's worker, answered at once
//   auto    inline when the image lives on a memory file system (tmpfs, ramfs, hugetlbfs), where
//           the call is a page-cache copy that never waits for a device and io_uring would hand
//           every request to a kernel worker thread (no non-blocking path there); uring otherwise
enum class IoPath : std::uint8_t { automatic, uring, inline_call };
// "auto", "uring", "inline": the --io spelling.
const char* to_string(IoPath p) noexcept;

struct BlkOptions {
  std::string image;             // raw image file or block device
  bool read_only = false;        // VIRTIO_BLK_F_RO; writes answered with IOERR
  std::uint16_t num_queues = 1;  // 1..kMaxQueues
  std::uint32_t blk_size = 512;  // logical block size reported to the driver: 512 or 4096
  std::string serial;            // GET_ID (up to 20 bytes); empty: "vhostkit-" + basename
  bool try_direct = true;        // O_DIRECT when the file system allows it
  IoPath io = IoPath::automatic;
  // Offer VIRTIO_F_RING_PACKED (both layouts are served; false refuses it, for comparison).
  bool packed = true;
  // Offer VIRTIO_F_IN_ORDER where requests complete in the order they were made available: the
  // inline I/O path only (each request is answered before the next is popped). io_uring
  // completes requests in whatever order the kernel finishes them, and holding completions back
  // to answer in order would let one slow request stall every later one, so the io_uring path
  // never offers it. false refuses it on the inline path too.
  bool in_order = true;
  // Holds each request's answer back this long after its I/O finished (an IORING_OP_TIMEOUT
  // linked behind the I/O), to stand in for a slower disk: a restart test needs requests in
  // flight when it kills the back-end, as QEMU's null-co has latency-ns for the same end. A
  // failed I/O breaks the link and is answered at once. Zero: no delay. Needs the io_uring path
  // (IoPath::automatic then takes it); at most kMaxAddedLatency.
  std::chrono::microseconds added_latency{0};
};

// A snapshot of one queue's counters.
struct BlkStats {
  std::uint64_t reads = 0;   // IN requests completed OK
  std::uint64_t writes = 0;  // OUT requests completed OK
  std::uint64_t flushes = 0;
  std::uint64_t discards = 0;  // DISCARD and WRITE_ZEROES completed OK
  std::uint64_t get_ids = 0;
  std::uint64_t bytes_read = 0;
  std::uint64_t bytes_written = 0;
  std::uint64_t io_errors = 0;     // the backing store failed a request (IOERR sent)
  std::uint64_t bad_requests = 0;  // malformed requests answered with IOERR or UNSUPP
  std::uint64_t no_status = 0;     // malformed chains with no status byte (used len 0)
  std::uint64_t buffered = 0;      // requests sent through the buffered fd (misaligned)
};

class BlkDevice final : public vhost::DeviceBackend {
 public:
  static constexpr std::uint16_t kMaxQueues = 64;
  // Data segments per request (config seg_max): a chain has at most this plus header and status.
  static constexpr std::uint32_t kSegMax = 126;
  // Requests in flight per queue (io_uring SQ depth).
  static constexpr std::uint32_t kMaxInflight = 128;
  // The most one request moves, and so the largest segment (config size_max): what one
  // readv/writev transfers (Linux's MAX_RW_COUNT); a bigger request would come back short.
  static constexpr std::uint32_t kMaxTransfer = 0x7ffff000;
  // DISCARD / WRITE_ZEROES limits (config space): one segment of at most this many sectors.
  static constexpr std::uint32_t kMaxDiscardSectors = 1u << 22;  // 2 GiB
  // The most BlkOptions::added_latency may be.
  static constexpr std::chrono::microseconds kMaxAddedLatency{10'000'000};

  // Opens the image (O_DIRECT if possible, falling back to buffered I/O) and checks the options:
  // a size that is a positive multiple of 512, num_queues 1..kMaxQueues, blk_size 512 or 4096,
  // added_latency within kMaxAddedLatency and not on the inline path.
  static Result<std::unique_ptr<BlkDevice>> open(BlkOptions opts);
  ~BlkDevice() override;
  BlkDevice(const BlkDevice&) = delete;
  BlkDevice& operator=(const BlkDevice&) = delete;

  // vhost::DeviceBackend
  std::uint64_t features() const noexcept override;
  std::uint16_t num_queues() const noexcept override;
  // Requests are recorded in the inflight region when the front-end gives one, and those a
  // previous back-end left unanswered are resubmitted first: a restart loses or repeats none.
  bool tracks_inflight() const noexcept override { return true; }
  Result<> read_config(std::uint32_t offset, std::span<std::uint8_t> out) const override;
  void set_features(std::uint64_t acked) noexcept override;
  void queue_started(vhost::Queue& q, vhost::Worker& w) override;
  void queue_stopped(vhost::Queue& q, vhost::Worker& w) override;
  void quiesce(vhost::Queue& q, vhost::Worker& w) override;
  bool handle_queue(vhost::Queue& q) noexcept override;
  // Requests in flight in io_uring (its fd is watched by the worker for their completions).
  bool waiting_on_io(const vhost::Queue& q) const noexcept override;

  std::uint64_t capacity_sectors() const noexcept { return capacity_; }
  bool read_only() const noexcept { return opts_.read_only; }
  bool direct_io() const noexcept { return direct_; }
  // The path chosen at open (never automatic): uring or inline_call.
  IoPath io_path() const noexcept { return io_; }
  std::chrono::microseconds added_latency() const noexcept { return opts_.added_latency; }
  // True if the image is on a memory file system (what IoPath::automatic looks at).
  bool memory_backed() const noexcept { return memory_backed_; }
  const std::string& serial() const noexcept { return serial_; }
  BlkStats stats(std::uint16_t queue) const noexcept;
  // Requests in flight on a queue (tests; any thread, approximate).
  std::uint32_t inflight(std::uint16_t queue) const noexcept;

  struct QueueState;  // per-queue data-path state (src/blk/blk_queue.h)
  struct Backing;     // the backing store as the queues see it (src/blk/blk_queue.h)

 private:
  explicit BlkDevice(BlkOptions opts);

  BlkOptions opts_;
  UniqueFd fd_;           // O_DIRECT when direct_, else buffered
  UniqueFd buffered_fd_;  // for requests whose buffers O_DIRECT can't take (invalid if !direct_)
  bool direct_ = false;
  bool memory_backed_ = false;
  IoPath io_ = IoPath::uring;
  std::uint64_t capacity_ = 0;  // 512-byte sectors
  std::string serial_;
  std::uint64_t offered_ = 0;
  std::unique_ptr<Backing> backing_;
  std::unique_ptr<QueueState[]> queues_;
};

}  // namespace vhostkit::blk
