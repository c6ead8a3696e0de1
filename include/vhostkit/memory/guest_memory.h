// Guest memory as the backend sees it: a table of regions shared by the frontend (memfd or
// hugetlbfs fds, mapped MAP_SHARED), and the translations the data path needs:
//   guest-physical address (descriptor addr fields)      -> host pointer
//   frontend userspace address (vhost-user vring addrs)  -> host pointer
// Every translation is bounds-checked with overflow-safe arithmetic; a range that spans two
// adjacent regions translates to two pieces.
//
// Threading: translations are const and may run on any number of threads at once. Mutations
// (add/remove region, attach a log) must not overlap any translation; vhost::Device guarantees
// that by swapping tables only while its worker is parked.
#pragma once

#include <sys/uio.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <expected>
#include <memory>
#include <span>
#include <vector>

#include "vhostkit/error.h"
#include "vhostkit/unique_fd.h"
#include "vhostkit/virtio/ring.h"

namespace vhostkit::memory {

// What a frontend says about one region (VhostUserMemoryRegion).
struct RegionSpec {
  std::uint64_t guest_phys_addr = 0;
  std::uint64_t size = 0;
  std::uint64_t userspace_addr = 0;  // the frontend's virtual address of the region
  std::uint64_t mmap_offset = 0;     // where the region starts within the fd
};

// A region as the frontend hands it over: what it says, and the fd to map it from. The codec
// decodes SET_MEM_TABLE and ADD_MEM_REG into these and vhost::Device takes them as they are.
struct RegionFd {
  RegionSpec spec;
  UniqueFd fd;
};

// Where a ring's three parts live, in the frontend's address space (vhost_vring_addr, as
// SET_VRING_ADDR carries it); uva_to_host translates them. The codec decodes into this type and
// vhost::Device takes it as it is.
struct VringAddr {
  std::uint32_t flags = 0;  // virtio::kVhostVringFLog: log used-ring writes
  std::uint64_t desc_user_addr = 0;
  std::uint64_t used_user_addr = 0;
  std::uint64_t avail_user_addr = 0;
  std::uint64_t log_guest_addr = 0;
  bool log_used() const noexcept { return (flags & virtio::kVhostVringFLog) != 0; }
  bool operator==(const VringAddr&) const = default;
};

// One mapped region.
struct Region {
  RegionSpec spec;
  std::uint8_t* host = nullptr;  // host address of guest_phys_addr
  void* map_base = nullptr;      // what mmap returned (null for local regions)
  std::size_t map_len = 0;
  UniqueFd fd;  // kept open while mapped (invalid for local regions)
};

// Why a data-path translation failed. No strings: the data path only counts these.
enum class XlateError : std::uint8_t {
  not_mapped,    // some byte of the range is in no region
  wraps,         // addr + len overflows 64 bits
  too_many_iov,  // the range needs more pieces than the caller's array holds
};

class DirtyLog;

class GuestMemory {
 public:
  // QEMU's vhost-user backends advertise up to 509 memory slots (GET_MAX_MEM_SLOTS).
  static constexpr std::size_t kMaxRegions = 509;

  GuestMemory();
  ~GuestMemory();
  GuestMemory(GuestMemory&&) noexcept;
  GuestMemory& operator=(GuestMemory&&) noexcept;
  GuestMemory(const GuestMemory&) = delete;
  GuestMemory& operator=(const GuestMemory&) = delete;

  // Validates the region (non-zero size, no wrap in either address space, no overlap with an
  // existing region in guest-physical or frontend space, mmap_offset + size within the fd's
  // size, the slot limit) and maps it MAP_SHARED. The file is sealed against shrinking first
  // where it takes seals (seal_against_shrink). Takes the fd in every case: on failure it is
  // closed.
  Result<> add_region(const RegionSpec& spec, UniqueFd fd);

  // A region that is already in this process's address space (tests, our own frontend's view of
  // its memory). Same validation, no mmap. `host` must cover spec.size bytes.
  Result<> add_local_region(const RegionSpec& spec, void* host);

  // Unmaps the region that matches exactly (REM_MEM_REG: guest_phys_addr, size, userspace_addr).
  Result<> remove_region(const RegionSpec& spec);

  // Unmaps every region.
  void clear() noexcept;

  std::size_t region_count() const noexcept;
  std::span<const Region> regions() const noexcept;

  // Fast path: host pointer of [gpa, gpa + len) when it lies inside one region, else nullptr.
  // len == 0 asks only that gpa be mapped. Inline because it runs per descriptor: when the
  // last region that answered answers again, this is two loads, a subtract and two compares.
  std::uint8_t* gpa_to_host(std::uint64_t gpa, std::uint64_t len) const noexcept {
    // Relaxed: the hint is only a guess, validated below; it publishes nothing.
    const std::size_t h = std::atomic_ref<std::size_t>(last_hit_).load(std::memory_order_relaxed);
    if (h < regions_.size()) [[likely]] {
      const Region& r = regions_[h];
      // off < size rejects gpa below the region too (unsigned wrap); the length test cannot
      // overflow because off < size.
      const std::uint64_t off = gpa - r.spec.guest_phys_addr;
      if (off < r.spec.size && len <= r.spec.size - off) [[likely]]
        return r.host + off;
    }
    return gpa_to_host_slow(gpa, len);
  }

  // [gpa, gpa + len) split at region boundaries into `out`; returns the number of pieces.
  std::expected<std::size_t, XlateError> gpa_to_iovec(std::uint64_t gpa, std::uint64_t len,
                                                      std::span<iovec> out) const noexcept;

  // Frontend userspace address (vring desc/avail/used in vhost-user) to host: must lie inside
  // one region.
  std::uint8_t* uva_to_host(std::uint64_t uva, std::uint64_t len) const noexcept;

  // Frontend userspace address to guest-physical (used to log used-ring writes).
  std::expected<std::uint64_t, XlateError> uva_to_gpa(std::uint64_t uva) const noexcept;

  // Dirty logging for live migration; null when not logging. Not owned.
  void set_dirty_log(DirtyLog* log) noexcept { log_ = log; }
  DirtyLog* dirty_log() const noexcept { return log_; }
  // Marks [gpa, gpa + len) dirty if a log is attached. Called after every device write.
  void log_write(std::uint64_t gpa, std::uint64_t len) const noexcept;
  // Marks the pages behind the first `len` bytes of `iov`, host addresses this table
  // translated (a chain's writable buffers), if a log is attached. The used length of a chain
  // is what the device wrote into its writable part, so one call per used entry covers every
  // buffer write. A piece outside every region (not from this table) is skipped and counted
  // in the log's dropped().
  void log_host_write(std::span<const iovec> iov, std::size_t len) const noexcept;

 private:
  std::uint8_t* gpa_to_host_slow(std::uint64_t gpa, std::uint64_t len) const noexcept;
  const Region* find_gpa(std::uint64_t gpa) const noexcept;
  const Region* find_uva(std::uint64_t uva) const noexcept;
  Result<> check_new(const RegionSpec& spec) const;
  void insert(Region r);  // keeps regions_ sorted, rebuilds uva_order_
  void rebuild_index();

  std::vector<Region> regions_;  // sorted by guest_phys_addr
  // Indices into regions_, sorted by userspace_addr (frontend space is ordered independently).
  std::vector<std::uint16_t> uva_order_;
  // Hints: index of the region that answered last. Read and written with relaxed atomic_ref so
  // concurrent translations do not race; a stale hint only costs a binary search.
  mutable std::size_t last_hit_ = 0;      // into regions_ (gpa lookups)
  mutable std::size_t last_uva_hit_ = 0;  // into regions_ (uva lookups)
  DirtyLog* log_ = nullptr;
};

// The vhost-user dirty log (SET_LOG_BASE with a shared fd): one bit per 4 KiB guest page,
// set atomically by the device after it writes guest memory. Marks past the end of the log are
// dropped and counted, never written (Linux CVE-2019-14835 was an out-of-bounds log write).
class DirtyLog {
 public:
  static constexpr std::uint64_t kPageSize = 4096;

  DirtyLog() = default;
  ~DirtyLog();
  DirtyLog(const DirtyLog&) = delete;
  DirtyLog& operator=(const DirtyLog&) = delete;

  // Maps `size` bytes at `offset` of fd (VhostUserLog {mmap_size, mmap_offset}).
  Result<> attach(UniqueFd fd, std::uint64_t size, std::uint64_t offset);
  // A log in local memory (tests).
  Result<> attach_local(std::span<std::uint8_t> bitmap);
  void detach() noexcept;
  bool attached() const noexcept { return bits_ != nullptr; }

  void mark(std::uint64_t gpa, std::uint64_t len) noexcept;
  bool is_dirty(std::uint64_t gpa) const noexcept;
  // A mark the caller could not place (a host address outside the memory table).
  void count_dropped() noexcept {
    std::atomic_ref<std::uint64_t>(dropped_).fetch_add(1, std::memory_order_relaxed);
  }
  // Marks that reached past the end of the bitmap (each counted once, however many pages), and
  // those counted by count_dropped().
  std::uint64_t dropped() const noexcept {
    // atomic_ref<const T> is C++26; the load does not modify.
    return std::atomic_ref<std::uint64_t>(const_cast<std::uint64_t&>(dropped_))
        .load(std::memory_order_relaxed);
  }

 private:
  std::uint8_t* bits_ = nullptr;
  std::uint64_t bytes_ = 0;
  void* map_base_ = nullptr;
  std::size_t map_len_ = 0;
  UniqueFd fd_;
  std::uint64_t dropped_ = 0;
};

// A file shared with a peer can be shrunk under our mapping, and an access past its new end is a
// SIGBUS. Where the file takes seals (a memfd made with MFD_ALLOW_SEALING and not sealed against
// more seals, as QEMU's memory-backend-memfd,seal=off and the inflight region's peers make them)
// this adds F_SEAL_SHRINK, which only forbids shrinking: the peer may still grow it and punch
// holes in it. Files that take no seals (hugetlbfs files, memfds without MFD_ALLOW_SEALING) are
// left as they are. Returns true if the file can no longer shrink (sealed now or before).
bool seal_against_shrink(int fd) noexcept;

}  // namespace vhostkit::memory
