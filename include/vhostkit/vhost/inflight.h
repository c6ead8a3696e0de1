// vhost::InflightRegion: the shared buffer of VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD ("Inflight I/O
// tracking" in QEMU's docs/interop/vhost-user.rst). The back-end records there which heads it has
// taken from each ring and not yet answered; the front-end keeps the fd across a back-end restart
// and hands it to the next back-end, which resubmits those heads in their original order. Without
// it a restarted back-end can only rewind to the used index, which loses or repeats requests that
// completed out of order.
//
// GET_INFLIGHT_FD is allocate(), SET_INFLIGHT_FD is attach(). A region from the peer is hostile:
// attach() checks its size and offset against the fd and every queue's fields against the shape,
// and recover() checks the queue again on the copy it works from, because the peer can write the
// region at any time. Nothing read from the region is used as an index without a bound check.
//
// Only the split-ring layout exists today; InflightLayout is where the packed one (32-byte
// DescStatePacked entries, a free list instead of the batch list) joins, with its own queue type.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "vhostkit/error.h"
#include "vhostkit/unique_fd.h"

namespace vhostkit::vhost {

// The spec's DescStateSplit: one per descriptor-table entry, used for heads only.
struct InflightSplitDesc {
  std::uint8_t inflight;  // 1 while the head is taken and unanswered
  std::uint8_t padding[5];
  std::uint16_t next;     // links the heads of the last published batch
  std::uint64_t counter;  // submission order
};
static_assert(sizeof(InflightSplitDesc) == 16);
static_assert(offsetof(InflightSplitDesc, inflight) == 0);
static_assert(offsetof(InflightSplitDesc, next) == 6);
static_assert(offsetof(InflightSplitDesc, counter) == 8);

// The spec's QueueRegionSplit without its flexible desc[] tail.
struct InflightSplitHeader {
  std::uint64_t features;         // none defined: 0
  std::uint16_t version;          // 0: never set up (nothing in flight), 1: this layout
  std::uint16_t desc_num;         // entries in desc[]: the queue size
  std::uint16_t last_batch_head;  // first head of the last published batch's list
  std::uint16_t used_idx;         // the used idx once the last batch was cleared
};
static_assert(sizeof(InflightSplitHeader) == 16);
static_assert(offsetof(InflightSplitHeader, features) == 0);
static_assert(offsetof(InflightSplitHeader, version) == 8);
static_assert(offsetof(InflightSplitHeader, desc_num) == 10);
static_assert(offsetof(InflightSplitHeader, last_batch_head) == 12);
static_assert(offsetof(InflightSplitHeader, used_idx) == 14);

enum class InflightLayout : std::uint8_t { split };

// The sizes every anchor (libvhost-user, DPDK) uses, so a region outlives a change of back-end:
// queue regions back to back, each rounded up to 64 bytes.
inline constexpr std::uint64_t kInflightAlign = 64;
inline constexpr std::uint16_t kInflightVersion = 1;
// QEMU's VIRTQUEUE_MAX: a device has no more virtqueues than this.
inline constexpr std::uint16_t kInflightMaxQueues = 1024;
inline constexpr std::uint32_t kInflightMaxQueueSize = 32768;

// Bytes of one queue's region; queue_size must be valid for the layout (see inflight_size).
constexpr std::uint64_t inflight_queue_bytes(InflightLayout, std::uint32_t queue_size) noexcept {
  const std::uint64_t raw =
      sizeof(InflightSplitHeader) + std::uint64_t{queue_size} * sizeof(InflightSplitDesc);
  return (raw + kInflightAlign - 1) / kInflightAlign * kInflightAlign;
}

// The whole region for a shape, or why the shape is refused: num_queues 1..kInflightMaxQueues,
// queue_size a power of two up to kInflightMaxQueueSize (a split ring's sizes).
Result<std::uint64_t> inflight_size(InflightLayout layout, std::uint32_t num_queues,
                                    std::uint32_t queue_size);

// What recover() found in a queue's region, for the device to act on before it pops new heads.
struct InflightRecovery {
  // The heads still in flight, in the order they were first submitted (by counter): resubmit
  // them in this order, before any new head. They stay marked; a new submit() of one is harmless.
  std::vector<std::uint16_t> resubmit;
  std::uint16_t used_idx = 0;  // the ring's used idx, now also the region's
  // Where popping new heads resumes: every head taken before the restart is either in the used
  // ring or in `resubmit`. (A front-end that lost the back-end sets the base to the used idx.)
  std::uint16_t last_avail_idx = 0;
  // Heads of a batch whose used entries were published but whose marks the crash left set.
  std::uint16_t batch_cleared = 0;
  bool initialized = false;  // the queue's region was never set up (version 0) and now is
};

// One split ring's part of the region. The data-path calls run on the ring's worker only, are
// noexcept, allocation-free and never read the region (the peer may have changed it): every head
// they are given is bounded by the queue size, and what they write is what a restarted back-end
// needs. recover() runs on the control path while the ring is stopped.
//
// Per request: submit(head) before the request is started; when it is answered, used(head) as
// its used entry is pushed, then published(idx) once the ring's used idx says idx. Every used
// entry the ring publishes must go through used(), answered request or not: recovery walks the
// batch list by the count of published entries.
class InflightSplitQueue {
 public:
  // Only an InflightRegion makes these, over its own checked mapping.
  class Key {
    friend class InflightRegion;
    Key() = default;
  };
  InflightSplitQueue(Key, std::uint16_t index, std::uint8_t* base, std::uint16_t queue_size);

  std::uint16_t index() const noexcept { return index_; }
  std::uint16_t queue_size() const noexcept { return size_; }

  // At ring start, before the first submit(): checks the queue's region against the shape and
  // the ring (ring_size, what SET_VRING_NUM gave, <= queue_size), finishes a batch the previous
  // back-end published but did not clear (ring_used_idx: the used idx the ring shows), and
  // returns the heads to resubmit. A version-0 region is set up empty. Errors name the queue
  // and the field, and leave the region as it was.
  Result<InflightRecovery> recover(std::uint16_t ring_used_idx, std::uint32_t ring_size);

  // The head was taken from the avail ring and its request is about to start.
  void submit(std::uint16_t head) noexcept;
  // The head's used entry was pushed (not yet published).
  void used(std::uint16_t head) noexcept;
  // The ring's used idx now reads used_idx: the batch's heads are no longer in flight.
  void published(std::uint16_t used_idx) noexcept;

  // Calls that broke the rules above (a head out of range, a batch over the queue size, a
  // published count unlike the batch's): each one a device bug, counted instead of trusted.
  std::uint64_t misuse() const noexcept { return misuse_; }
  std::uint64_t next_counter() const noexcept { return counter_; }

 private:
  friend class InflightRegion;
  InflightSplitHeader* header() const noexcept;
  InflightSplitDesc* desc() const noexcept;

  std::uint16_t index_;
  std::uint8_t* base_;  // this queue's region inside the mapping
  std::uint16_t size_;
  std::uint64_t counter_ = 0;
  // Our own copies of what we last wrote, so the data path never reads the shared region.
  std::uint16_t last_batch_head_ = 0;
  std::uint16_t used_idx_ = 0;
  std::unique_ptr<std::uint16_t[]> batch_;  // heads since the last published(), size_ entries
  std::uint32_t batch_len_ = 0;
  std::uint64_t misuse_ = 0;
};

class InflightRegion {
 public:
  // GET_INFLIGHT_FD: a zeroed, sealed memfd of inflight_size() bytes, mapped. Send fd(),
  // mmap_size() and mmap_offset() (0) in the reply.
  static Result<InflightRegion> allocate(InflightLayout layout, std::uint32_t num_queues,
                                         std::uint32_t queue_size);
  // SET_INFLIGHT_FD: the peer's fd (owned from here, closed on every error), with the sizes
  // from its message. mmap_size must be exactly inflight_size() of the shape, the range within
  // the file, mmap_offset a multiple of kInflightAlign; each queue already set up must match
  // the shape (recover() checks it again at ring start). A sealable fd is sealed against
  // shrinking so the peer cannot truncate the file under the mapping.
  static Result<InflightRegion> attach(UniqueFd fd, std::uint64_t mmap_size,
                                       std::uint64_t mmap_offset, InflightLayout layout,
                                       std::uint32_t num_queues, std::uint32_t queue_size);

  InflightRegion(InflightRegion&&) noexcept;
  InflightRegion& operator=(InflightRegion&&) noexcept;
  InflightRegion(const InflightRegion&) = delete;
  InflightRegion& operator=(const InflightRegion&) = delete;
  ~InflightRegion();

  int fd() const noexcept { return fd_.get(); }
  std::uint64_t mmap_size() const noexcept { return size_; }
  std::uint64_t mmap_offset() const noexcept { return offset_; }
  InflightLayout layout() const noexcept { return layout_; }
  std::uint16_t num_queues() const noexcept { return static_cast<std::uint16_t>(queues_.size()); }
  std::uint16_t queue_size() const noexcept { return queue_size_; }
  // index < num_queues(); nullptr otherwise.
  InflightSplitQueue* split_queue(std::uint32_t index) noexcept;
  const InflightSplitQueue* split_queue(std::uint32_t index) const noexcept {
    return const_cast<InflightRegion*>(this)->split_queue(index);
  }

 private:
  InflightRegion() = default;
  void unmap() noexcept;
  static Result<InflightRegion> map(UniqueFd fd, std::uint64_t size, std::uint64_t offset,
                                    InflightLayout layout, std::uint32_t num_queues,
                                    std::uint32_t queue_size);

  UniqueFd fd_;
  void* map_base_ = nullptr;
  std::size_t map_len_ = 0;
  std::uint8_t* base_ = nullptr;  // the region: map_base_ + (offset_ within its page)
  std::uint64_t size_ = 0;
  std::uint64_t offset_ = 0;
  InflightLayout layout_ = InflightLayout::split;
  std::uint16_t queue_size_ = 0;
  std::vector<InflightSplitQueue> queues_;
};

}  // namespace vhostkit::vhost
