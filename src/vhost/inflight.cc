#include <fcntl.h>
#include <fmt/format.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <utility>

#include "vhostkit/memory/guest_memory.h"
#include "vhostkit/vhost/inflight.h"

namespace vhostkit::vhost {
namespace {

// The region is shared with the front-end, so every store goes through atomic_ref: relaxed is
// enough, nobody reads it while we run. What matters is the order of our stores as seen by the
// next back-end after this one is killed at any instruction; a kill is a signal, so the
// compiler barriers below (atomic_signal_fence) are the fences that order them.
template <typename T>
void put(T& field, T value) noexcept {
  std::atomic_ref<T>(field).store(value, std::memory_order_relaxed);
}

bool is_power_of_two(std::uint32_t v) noexcept { return v != 0 && (v & (v - 1)) == 0; }

// A copy of one queue's region: checks and recovery read only this, never the shared bytes
// twice.
struct Snapshot {
  InflightSplitHeader header;
  std::vector<InflightSplitDesc> desc;
};

Snapshot take(const std::uint8_t* base, std::uint16_t queue_size) {
  Snapshot s;
  std::memcpy(&s.header, base, sizeof s.header);
  s.desc.resize(queue_size);
  std::memcpy(s.desc.data(), base + sizeof s.header, queue_size * sizeof(InflightSplitDesc));
  return s;
}

// What attach() and recover() both refuse in a queue that was set up (version 1): the fields
// checked against the shape alone.
Result<> check_fields(std::uint16_t q, const Snapshot& s, std::uint16_t queue_size) {
  const InflightSplitHeader& h = s.header;
  if (h.version != kInflightVersion) {
    return fail(Errc::invalid_argument,
                fmt::format("inflight queue {}: version {} (0 or {} expected)", q, h.version,
                            kInflightVersion));
  }
  if (h.features != 0) {
    return fail(Errc::unsupported,
                fmt::format("inflight queue {}: features {:#x} (none are defined)", q, h.features));
  }
  if (h.desc_num != queue_size) {
    return fail(Errc::invalid_argument,
                fmt::format("inflight queue {}: desc_num {}, but the region has {} entries per "
                            "queue",
                            q, h.desc_num, queue_size));
  }
  if (h.last_batch_head >= queue_size) {
    return fail(Errc::out_of_range,
                fmt::format("inflight queue {}: last_batch_head {} out of range (queue size {})", q,
                            h.last_batch_head, queue_size));
  }
  for (std::uint16_t i = 0; i < queue_size; ++i) {
    const InflightSplitDesc& d = s.desc[i];
    if (d.inflight > 1) {
      return fail(
          Errc::invalid_argument,
          fmt::format("inflight queue {}: desc[{}].inflight is {:#x} (0 or 1)", q, i, d.inflight));
    }
    if (d.next >= queue_size) {
      return fail(Errc::out_of_range,
                  fmt::format("inflight queue {}: desc[{}].next {} out of range (queue size {})", q,
                              i, d.next, queue_size));
    }
  }
  return {};
}

}  // namespace

Result<std::uint64_t> inflight_size(InflightLayout layout, std::uint32_t num_queues,
                                    std::uint32_t queue_size) {
  if (num_queues == 0 || num_queues > kInflightMaxQueues) {
    return fail(Errc::out_of_range, fmt::format("inflight region: num_queues {} (1..{})",
                                                num_queues, kInflightMaxQueues));
  }
  if (!is_power_of_two(queue_size) || queue_size > kInflightMaxQueueSize) {
    return fail(Errc::out_of_range,
                fmt::format("inflight region: queue_size {} (a power of two up to {})", queue_size,
                            kInflightMaxQueueSize));
  }
  // At most 1024 * 524352 bytes: no overflow.
  return std::uint64_t{num_queues} * inflight_queue_bytes(layout, queue_size);
}

// ---- one queue -------------------------------------------------------------------------------

InflightSplitQueue::InflightSplitQueue(Key, std::uint16_t index, std::uint8_t* base,
                                       std::uint16_t queue_size)
    : index_(index),
      base_(base),
      size_(queue_size),
      batch_(std::make_unique<std::uint16_t[]>(queue_size)) {}

InflightSplitHeader* InflightSplitQueue::header() const noexcept {
  return reinterpret_cast<InflightSplitHeader*>(base_);
}

InflightSplitDesc* InflightSplitQueue::desc() const noexcept {
  return reinterpret_cast<InflightSplitDesc*>(base_ + sizeof(InflightSplitHeader));
}

namespace {
constexpr std::uint64_t kRenumberFrom = std::uint64_t{1} << 63;
}  // namespace

Result<InflightRecovery> InflightSplitQueue::recover(std::uint16_t ring_used_idx,
                                                     std::uint32_t ring_size) {
  if (ring_size == 0 || ring_size > size_) {
    return fail(Errc::out_of_range,
                fmt::format("inflight queue {}: ring size {}, but the region tracks {} entries",
                            index_, ring_size, size_));
  }
  const Snapshot s = take(base_, size_);
  InflightRecovery out;
  out.used_idx = ring_used_idx;
  out.last_avail_idx = ring_used_idx;

  if (s.header.version == 0) {
    // Never set up: nothing was in flight. Whatever the bytes hold is not ours; clear them, and
    // write the version last so a crash half-way leaves a region that is set up again.
    std::memset(desc(), 0, size_ * sizeof(InflightSplitDesc));
    InflightSplitHeader* h = header();
    put(h->features, std::uint64_t{0});
    put(h->desc_num, size_);
    put(h->last_batch_head, std::uint16_t{0});
    put(h->used_idx, ring_used_idx);
    std::atomic_signal_fence(std::memory_order_seq_cst);  // the fields above before the version
    put(h->version, kInflightVersion);
    counter_ = 0;
    last_batch_head_ = 0;
    used_idx_ = ring_used_idx;
    batch_len_ = 0;
    out.initialized = true;
    return out;
  }
  if (auto ok = check_fields(index_, s, size_); !ok) return std::unexpected(std::move(ok.error()));

  // The spec's rule: a used idx in the region behind the ring's means the back-end published a
  // batch and died before clearing its marks; the batch is the list from last_batch_head, as
  // long as the difference. Those heads are answered, not to be resubmitted.
  const auto batch = static_cast<std::uint16_t>(ring_used_idx - s.header.used_idx);
  if (batch > ring_size) {
    return fail(Errc::out_of_range,
                fmt::format("inflight queue {}: used_idx {} but the ring's used idx is {}: a "
                            "batch of {} on a ring of {}",
                            index_, s.header.used_idx, ring_used_idx, batch, ring_size));
  }
  std::vector<std::uint8_t> answered(size_, 0);
  std::vector<std::uint16_t> cleared;
  cleared.reserve(batch);
  std::uint16_t head = s.header.last_batch_head;
  for (std::uint16_t n = 0; n < batch; ++n) {
    if (head >= ring_size) {
      return fail(Errc::out_of_range,
                  fmt::format("inflight queue {}: the last batch lists head {} (ring size {})",
                              index_, head, ring_size));
    }
    // A list that runs in a circle clears fewer heads; those stay marked and are resubmitted,
    // which costs a duplicate at worst, never an access out of range.
    if (!answered[head] && s.desc[head].inflight == 1) cleared.push_back(head);
    answered[head] = 1;
    head = s.desc[head].next;  // < size_: check_fields
  }

  struct Pending {
    std::uint64_t counter;
    std::uint16_t head;
  };
  std::vector<Pending> pending;
  for (std::uint16_t i = 0; i < size_; ++i) {
    if (s.desc[i].inflight == 0 || answered[i]) continue;
    if (i >= ring_size) {
      return fail(Errc::out_of_range,
                  fmt::format("inflight queue {}: desc[{}] is in flight but the ring has {} "
                              "entries",
                              index_, i, ring_size));
    }
    pending.push_back({s.desc[i].counter, i});
  }
  std::sort(pending.begin(), pending.end(),
            [](const Pending& a, const Pending& b) { return a.counter < b.counter; });
  for (std::size_t i = 1; i < pending.size(); ++i) {
    if (pending[i].counter == pending[i - 1].counter) {
      return fail(Errc::invalid_argument,
                  fmt::format("inflight queue {}: heads {} and {} share counter {}: the order to "
                              "resubmit them in is lost",
                              index_, pending[i - 1].head, pending[i].head, pending[i].counter));
    }
  }

  // All checked: finish the batch as the dead back-end would have. The marks go before the used
  // idx, so a crash in between repeats this step rather than losing it.
  for (std::uint16_t h : cleared) put(desc()[h].inflight, std::uint8_t{0});
  std::atomic_signal_fence(std::memory_order_seq_cst);  // the cleared marks before used_idx
  put(header()->used_idx, ring_used_idx);

  // Counters in the top half of their range (a peer's bytes, or a very long life) are renumbered
  // to their rank, so new requests never run out of later ones (a counter the last session gave
  // out could otherwise be the last one, and this queue refused on the next restart). In
  // ascending order, each to its rank: ranks are below every counter not yet renumbered (they
  // rise from 0 and are distinct), so a crash half-way leaves the same order behind.
  if (!pending.empty() && pending.back().counter >= kRenumberFrom) {
    for (std::size_t i = 0; i < pending.size(); ++i) {
      put(desc()[pending[i].head].counter, static_cast<std::uint64_t>(i));
      pending[i].counter = i;
    }
  }

  out.batch_cleared = static_cast<std::uint16_t>(cleared.size());
  out.resubmit.reserve(pending.size());
  for (const Pending& p : pending) out.resubmit.push_back(p.head);
  out.last_avail_idx = static_cast<std::uint16_t>(ring_used_idx + pending.size());
  counter_ = pending.empty() ? 0 : pending.back().counter + 1;
  last_batch_head_ = s.header.last_batch_head;
  used_idx_ = ring_used_idx;
  batch_len_ = 0;
  return out;
}

void InflightSplitQueue::submit(std::uint16_t head) noexcept {
  if (head >= size_) {
    ++misuse_;
    return;
  }
  InflightSplitDesc& d = desc()[head];
  put(d.counter, counter_++);
  std::atomic_signal_fence(std::memory_order_seq_cst);  // the counter before the mark
  put(d.inflight, std::uint8_t{1});
}

void InflightSplitQueue::used(std::uint16_t head) noexcept {
  if (head >= size_) {
    ++misuse_;
    return;
  }
  if (batch_len_ == size_) {
    // More used entries than the ring holds before a publish: the device lost count. The head
    // stays marked (resubmitted after a crash) rather than corrupt the list.
    ++misuse_;
    return;
  }
  put(desc()[head].next, last_batch_head_);
  std::atomic_signal_fence(std::memory_order_seq_cst);  // the link before the list's new head
  put(header()->last_batch_head, head);
  last_batch_head_ = head;
  batch_[batch_len_++] = head;
}

void InflightSplitQueue::published(std::uint16_t used_idx) noexcept {
  if (static_cast<std::uint16_t>(used_idx - used_idx_) != batch_len_) ++misuse_;
  // The ring's used idx store (the caller's, just before) comes before the marks are cleared:
  // a back-end killed in between leaves used_idx behind, and recover() clears the batch.
  std::atomic_signal_fence(std::memory_order_seq_cst);
  InflightSplitDesc* d = desc();
  for (std::uint32_t i = 0; i < batch_len_; ++i) put(d[batch_[i]].inflight, std::uint8_t{0});
  std::atomic_signal_fence(std::memory_order_seq_cst);  // the cleared marks before used_idx
  put(header()->used_idx, used_idx);
  used_idx_ = used_idx;
  batch_len_ = 0;
}

// ---- the region ------------------------------------------------------------------------------

InflightRegion::InflightRegion(InflightRegion&& o) noexcept { *this = std::move(o); }

InflightRegion& InflightRegion::operator=(InflightRegion&& o) noexcept {
  if (this != &o) {
    unmap();
    fd_ = std::move(o.fd_);
    map_base_ = std::exchange(o.map_base_, nullptr);
    map_len_ = std::exchange(o.map_len_, 0);
    base_ = std::exchange(o.base_, nullptr);
    size_ = std::exchange(o.size_, 0);
    offset_ = std::exchange(o.offset_, 0);
    layout_ = o.layout_;
    queue_size_ = std::exchange(o.queue_size_, 0);
    queues_ = std::move(o.queues_);  // their pointers stay valid: the mapping moved with them
    o.queues_.clear();
  }
  return *this;
}

InflightRegion::~InflightRegion() { unmap(); }

void InflightRegion::unmap() noexcept {
  queues_.clear();
  if (map_base_ != nullptr) ::munmap(map_base_, map_len_);
  map_base_ = nullptr;
  map_len_ = 0;
  base_ = nullptr;
  fd_.reset();
}

InflightSplitQueue* InflightRegion::split_queue(std::uint32_t index) noexcept {
  if (layout_ != InflightLayout::split || index >= queues_.size()) return nullptr;
  return &queues_[index];
}

Result<InflightRegion> InflightRegion::map(UniqueFd fd, std::uint64_t size, std::uint64_t offset,
                                           InflightLayout layout, std::uint32_t num_queues,
                                           std::uint32_t queue_size) {
  // mmap wants a page-aligned offset; map from the page below and point into it.
  const auto page = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
  const std::uint64_t map_off = offset & ~(page - 1);
  const std::uint64_t delta = offset - map_off;
  const std::uint64_t map_len = (delta + size + page - 1) & ~(page - 1);  // size <= 512 MiB
  void* base = ::mmap(nullptr, map_len, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(),
                      static_cast<off_t>(map_off));
  if (base == MAP_FAILED) {
    return fail_errno(
        fmt::format("inflight region: mmap of {:#x} bytes at {:#x}", map_len, map_off));
  }
  InflightRegion r;
  r.fd_ = std::move(fd);
  r.map_base_ = base;
  r.map_len_ = map_len;
  r.base_ = static_cast<std::uint8_t*>(base) + delta;
  r.size_ = size;
  r.offset_ = offset;
  r.layout_ = layout;
  r.queue_size_ = static_cast<std::uint16_t>(queue_size);  // <= 32768: inflight_size
  const std::uint64_t stride = inflight_queue_bytes(layout, queue_size);
  r.queues_.reserve(num_queues);
  for (std::uint32_t q = 0; q < num_queues; ++q) {
    r.queues_.emplace_back(InflightSplitQueue::Key(), static_cast<std::uint16_t>(q),
                           r.base_ + q * stride, r.queue_size_);
  }
  return r;
}

Result<InflightRegion> InflightRegion::allocate(InflightLayout layout, std::uint32_t num_queues,
                                                std::uint32_t queue_size) {
  auto size = inflight_size(layout, num_queues, queue_size);
  if (!size) return std::unexpected(std::move(size.error()));
  UniqueFd fd(::memfd_create("vhostkit-inflight", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (!fd.valid()) return fail_errno("inflight region: memfd_create");
  if (::ftruncate(fd.get(), static_cast<off_t>(*size)) != 0) {
    return fail_errno(fmt::format("inflight region: ftruncate to {:#x} bytes", *size));
  }
  // The front-end keeps this fd and gives it to our successor; sealed, nobody can resize the
  // file under a mapping (a shrink would turn our stores into SIGBUS).
  if (::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL) != 0) {
    return fail_errno("inflight region: sealing the memfd");
  }
  // A new memfd reads as zeros: every queue at version 0, set up by recover() at ring start.
  return map(std::move(fd), *size, 0, layout, num_queues, queue_size);
}

Result<InflightRegion> InflightRegion::attach(UniqueFd fd, std::uint64_t mmap_size,
                                              std::uint64_t mmap_offset, InflightLayout layout,
                                              std::uint32_t num_queues, std::uint32_t queue_size) {
  // fd is owned here: every early return closes it.
  if (!fd.valid()) return fail(Errc::invalid_argument, "inflight region: no fd");
  auto want = inflight_size(layout, num_queues, queue_size);
  if (!want) return std::unexpected(std::move(want.error()));
  if (mmap_size != *want) {
    return fail(Errc::invalid_argument,
                fmt::format("inflight region: mmap_size {:#x}, but {} queues of {} entries take "
                            "{:#x} bytes",
                            mmap_size, num_queues, queue_size, *want));
  }
  if (mmap_offset % kInflightAlign != 0) {
    return fail(Errc::invalid_argument,
                fmt::format("inflight region: mmap_offset {:#x} is not a multiple of {}",
                            mmap_offset, kInflightAlign));
  }
  if (mmap_offset > std::numeric_limits<std::uint64_t>::max() - mmap_size ||
      mmap_offset + mmap_size > static_cast<std::uint64_t>(std::numeric_limits<off_t>::max())) {
    return fail(Errc::out_of_range,
                fmt::format("inflight region: mmap_offset {:#x} + mmap_size {:#x} overflows",
                            mmap_offset, mmap_size));
  }
  // Seal before measuring, so the size checked is a size the file keeps. An fd that cannot be
  // sealed (no MFD_ALLOW_SEALING, or not a memfd: DPDK's regions) is taken as it is.
  memory::seal_against_shrink(fd.get());
  struct stat st{};
  if (::fstat(fd.get(), &st) != 0) {
    return fail_errno(fmt::format("inflight region: fstat of fd {}", fd.get()));
  }
  if (!S_ISREG(st.st_mode)) {
    return fail(Errc::invalid_argument,
                fmt::format("inflight region: fd {} is not a file or memfd (mode {:#o})", fd.get(),
                            st.st_mode & S_IFMT));
  }
  const std::uint64_t file_size = st.st_size > 0 ? static_cast<std::uint64_t>(st.st_size) : 0;
  if (mmap_offset + mmap_size > file_size) {
    return fail(Errc::out_of_range,
                fmt::format("inflight region: mmap_offset {:#x} + mmap_size {:#x} ends past the "
                            "end of the fd ({:#x} bytes)",
                            mmap_offset, mmap_size, file_size));
  }
  auto region = map(std::move(fd), mmap_size, mmap_offset, layout, num_queues, queue_size);
  if (!region) return region;
  // Early word on a region that makes no sense; recover() checks again on its own copy.
  for (std::uint32_t q = 0; q < num_queues; ++q) {
    const Snapshot s = take(region->queues_[q].base_, region->queue_size_);
    if (s.header.version == 0) continue;
    if (auto ok = check_fields(static_cast<std::uint16_t>(q), s, region->queue_size_); !ok) {
      return std::unexpected(std::move(ok.error()));
    }
  }
  return region;
}

}  // namespace vhostkit::vhost
