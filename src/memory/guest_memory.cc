#include "vhostkit/memory/guest_memory.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <utility>

namespace vhostkit::memory {
namespace {

constexpr std::uint64_t kU64Max = std::numeric_limits<std::uint64_t>::max();

// Half-open ranges [a, a + len): the table only holds regions whose end is representable, so
// `start + size` never overflows for a stored region.
inline bool contains(std::uint64_t start, std::uint64_t size, std::uint64_t addr,
                     std::uint64_t len) noexcept {
  // Unsigned subtraction turns "addr < start" into a huge offset, so one compare rejects both
  // sides; `len <= size - off` cannot overflow because off < size.
  const std::uint64_t off = addr - start;
  return off < size && len <= size - off;
}

inline bool ranges_overlap(std::uint64_t a, std::uint64_t alen, std::uint64_t b,
                           std::uint64_t blen) noexcept {
  return a < b + blen && b < a + alen;
}

// Relaxed is enough for the hints: they are only a guess that is re-validated before use, and
// nothing else is published through them.
inline std::size_t load_hint(std::size_t& h) noexcept {
  return std::atomic_ref<std::size_t>(h).load(std::memory_order_relaxed);
}
inline void store_hint(std::size_t& h, std::size_t v) noexcept {
  std::atomic_ref<std::size_t>(h).store(v, std::memory_order_relaxed);
}

std::uint64_t page_size() noexcept {
  static const std::uint64_t ps = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
  return ps;
}

void unmap(Region& r) noexcept {
  if (r.map_base != nullptr) ::munmap(r.map_base, r.map_len);
  r.map_base = nullptr;
  r.map_len = 0;
  r.host = nullptr;
  r.fd.reset();
}

}  // namespace

GuestMemory::GuestMemory() = default;

GuestMemory::~GuestMemory() { clear(); }

GuestMemory::GuestMemory(GuestMemory&& o) noexcept
    : regions_(std::move(o.regions_)),
      uva_order_(std::move(o.uva_order_)),
      last_hit_(o.last_hit_),
      last_uva_hit_(o.last_uva_hit_),
      log_(o.log_) {
  o.regions_.clear();
  o.uva_order_.clear();
  o.last_hit_ = 0;
  o.last_uva_hit_ = 0;
  o.log_ = nullptr;
}

GuestMemory& GuestMemory::operator=(GuestMemory&& o) noexcept {
  if (this != &o) {
    clear();
    regions_ = std::move(o.regions_);
    uva_order_ = std::move(o.uva_order_);
    last_hit_ = o.last_hit_;
    last_uva_hit_ = o.last_uva_hit_;
    log_ = o.log_;
    o.regions_.clear();
    o.uva_order_.clear();
    o.last_hit_ = 0;
    o.last_uva_hit_ = 0;
    o.log_ = nullptr;
  }
  return *this;
}

std::size_t GuestMemory::region_count() const noexcept { return regions_.size(); }

std::span<const Region> GuestMemory::regions() const noexcept { return regions_; }

Result<> GuestMemory::check_new(const RegionSpec& spec) const {
  if (spec.size == 0) {
    return fail(Errc::invalid_argument,
                fmt::format("region gpa {:#x} has size 0", spec.guest_phys_addr));
  }
  if (spec.size > kU64Max - spec.guest_phys_addr) {
    return fail(Errc::out_of_range, fmt::format("region gpa {:#x} size {:#x} wraps the guest "
                                                "physical address space",
                                                spec.guest_phys_addr, spec.size));
  }
  if (spec.size > kU64Max - spec.userspace_addr) {
    return fail(Errc::out_of_range,
                fmt::format("region uva {:#x} size {:#x} wraps the frontend address space",
                            spec.userspace_addr, spec.size));
  }
  if (spec.size > kU64Max - spec.mmap_offset) {
    return fail(Errc::out_of_range, fmt::format("region mmap_offset {:#x} size {:#x} wraps",
                                                spec.mmap_offset, spec.size));
  }
  if (regions_.size() >= kMaxRegions) {
    return fail(Errc::too_many,
                fmt::format("region gpa {:#x} size {:#x}: table already holds {} regions (max {})",
                            spec.guest_phys_addr, spec.size, regions_.size(), kMaxRegions));
  }
  // Sorted and disjoint in gpa: only the two neighbours of the insertion point can collide.
  auto it = std::upper_bound(
      regions_.begin(), regions_.end(), spec.guest_phys_addr,
      [](std::uint64_t gpa, const Region& r) { return gpa < r.spec.guest_phys_addr; });
  for (auto n : {it, it == regions_.begin() ? regions_.end() : it - 1}) {
    if (n == regions_.end()) continue;
    const RegionSpec& o = n->spec;
    if (ranges_overlap(spec.guest_phys_addr, spec.size, o.guest_phys_addr, o.size)) {
      return fail(Errc::overlap,
                  fmt::format("region gpa {:#x} size {:#x} overlaps region gpa {:#x} size {:#x}",
                              spec.guest_phys_addr, spec.size, o.guest_phys_addr, o.size));
    }
  }
  auto ut = std::upper_bound(
      uva_order_.begin(), uva_order_.end(), spec.userspace_addr,
      [this](std::uint64_t uva, std::uint16_t i) { return uva < regions_[i].spec.userspace_addr; });
  for (auto n : {ut, ut == uva_order_.begin() ? uva_order_.end() : ut - 1}) {
    if (n == uva_order_.end()) continue;
    const RegionSpec& o = regions_[*n].spec;
    if (ranges_overlap(spec.userspace_addr, spec.size, o.userspace_addr, o.size)) {
      return fail(
          Errc::overlap,
          fmt::format("region uva {:#x} size {:#x} overlaps region uva {:#x} size {:#x} "
                      "(gpa {:#x})",
                      spec.userspace_addr, spec.size, o.userspace_addr, o.size, o.guest_phys_addr));
    }
  }
  return {};
}

void GuestMemory::insert(Region r) {
  auto it = std::upper_bound(
      regions_.begin(), regions_.end(), r.spec.guest_phys_addr,
      [](std::uint64_t gpa, const Region& x) { return gpa < x.spec.guest_phys_addr; });
  regions_.insert(it, std::move(r));
  rebuild_index();
}

void GuestMemory::rebuild_index() {
  uva_order_.resize(regions_.size());
  for (std::size_t i = 0; i < regions_.size(); ++i) uva_order_[i] = static_cast<std::uint16_t>(i);
  std::sort(uva_order_.begin(), uva_order_.end(), [this](std::uint16_t a, std::uint16_t b) {
    return regions_[a].spec.userspace_addr < regions_[b].spec.userspace_addr;
  });
  // Indices moved; start the hints over rather than let them point at a neighbour.
  last_hit_ = 0;
  last_uva_hit_ = 0;
}

bool seal_against_shrink(int fd) noexcept {
  const int seals = ::fcntl(fd, F_GET_SEALS);
  if (seals < 0) return false;  // not a file that takes seals
  if ((seals & F_SEAL_SHRINK) != 0) return true;
  return (seals & F_SEAL_SEAL) == 0 && ::fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK) == 0;
}

Result<> GuestMemory::add_region(const RegionSpec& spec, UniqueFd fd) {
  // fd is owned here: every early return closes it.
  if (auto ok = check_new(spec); !ok) return ok;
  if (!fd.valid()) {
    return fail(Errc::invalid_argument,
                fmt::format("region gpa {:#x} size {:#x}: no fd", spec.guest_phys_addr, spec.size));
  }
  // Sealed before measuring, so the size checked is one the file keeps.
  seal_against_shrink(fd.get());
  struct stat st{};
  if (::fstat(fd.get(), &st) != 0) {
    return fail_errno(fmt::format("region gpa {:#x} size {:#x}: fstat of fd {}",
                                  spec.guest_phys_addr, spec.size, fd.get()));
  }
  const std::uint64_t file_size = st.st_size > 0 ? static_cast<std::uint64_t>(st.st_size) : 0;
  const std::uint64_t end = spec.mmap_offset + spec.size;  // no wrap: check_new
  if (end > file_size) {
    return fail(Errc::out_of_range,
                fmt::format("region gpa {:#x} size {:#x}: mmap_offset {:#x} + size ends at {:#x}, "
                            "past the end of the fd ({:#x} bytes)",
                            spec.guest_phys_addr, spec.size, spec.mmap_offset, end, file_size));
  }
  // hugetlbfs needs lengths in whole huge pages; its st_blksize is the huge page size.
  std::uint64_t align = page_size();
  const auto blk = static_cast<std::uint64_t>(st.st_blksize);
  if (blk > align && (blk & (blk - 1)) == 0) align = blk;
  const std::uint64_t map_len = (end + align - 1) & ~(align - 1);  // end <= file_size < 2^63
  // Map from offset 0 so mmap_offset needs no alignment; NORESERVE because the guest's memory is
  // already accounted to the frontend.
  void* base =
      ::mmap(nullptr, map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd.get(), 0);
  if (base == MAP_FAILED) {
    return fail_errno(fmt::format("region gpa {:#x} size {:#x}: mmap of {:#x} bytes",
                                  spec.guest_phys_addr, spec.size, map_len));
  }
  Region r;
  r.spec = spec;
  r.host = static_cast<std::uint8_t*>(base) + spec.mmap_offset;
  r.map_base = base;
  r.map_len = map_len;
  r.fd = std::move(fd);
  insert(std::move(r));
  return {};
}

Result<> GuestMemory::add_local_region(const RegionSpec& spec, void* host) {
  if (auto ok = check_new(spec); !ok) return ok;
  if (host == nullptr) {
    return fail(Errc::invalid_argument, fmt::format("local region gpa {:#x} size {:#x}: null host",
                                                    spec.guest_phys_addr, spec.size));
  }
  Region r;
  r.spec = spec;
  r.host = static_cast<std::uint8_t*>(host);
  insert(std::move(r));
  return {};
}

Result<> GuestMemory::remove_region(const RegionSpec& spec) {
  for (auto it = regions_.begin(); it != regions_.end(); ++it) {
    const RegionSpec& o = it->spec;
    if (o.guest_phys_addr == spec.guest_phys_addr && o.size == spec.size &&
        o.userspace_addr == spec.userspace_addr) {
      unmap(*it);
      regions_.erase(it);
      rebuild_index();
      return {};
    }
  }
  return fail(Errc::not_mapped, fmt::format("no region gpa {:#x} size {:#x} uva {:#x} to remove",
                                            spec.guest_phys_addr, spec.size, spec.userspace_addr));
}

void GuestMemory::clear() noexcept {
  for (Region& r : regions_) unmap(r);
  regions_.clear();
  uva_order_.clear();
  last_hit_ = 0;
  last_uva_hit_ = 0;
}

const Region* GuestMemory::find_gpa(std::uint64_t gpa) const noexcept {
  // Last region whose start is <= gpa; regions are disjoint, so it is the only candidate.
  const Region* first = regions_.data();
  std::size_t n = regions_.size();
  while (n > 1) {
    const std::size_t half = n / 2;
    if (first[half].spec.guest_phys_addr <= gpa) first += half;
    n -= half;
  }
  if (n == 0 || !contains(first->spec.guest_phys_addr, first->spec.size, gpa, 0)) return nullptr;
  store_hint(last_hit_, static_cast<std::size_t>(first - regions_.data()));
  return first;
}

const Region* GuestMemory::find_uva(std::uint64_t uva) const noexcept {
  const std::uint16_t* first = uva_order_.data();
  std::size_t n = uva_order_.size();
  while (n > 1) {
    const std::size_t half = n / 2;
    if (regions_[first[half]].spec.userspace_addr <= uva) first += half;
    n -= half;
  }
  if (n == 0) return nullptr;
  const Region& r = regions_[*first];
  if (!contains(r.spec.userspace_addr, r.spec.size, uva, 0)) return nullptr;
  store_hint(last_uva_hit_, *first);
  return &r;
}

// The hint missed (gpa_to_host is inline in the header).
std::uint8_t* GuestMemory::gpa_to_host_slow(std::uint64_t gpa, std::uint64_t len) const noexcept {
  const Region* r = find_gpa(gpa);
  if (r == nullptr || !contains(r->spec.guest_phys_addr, r->spec.size, gpa, len)) return nullptr;
  return r->host + (gpa - r->spec.guest_phys_addr);
}

std::expected<std::size_t, XlateError> GuestMemory::gpa_to_iovec(
    std::uint64_t gpa, std::uint64_t len, std::span<iovec> out) const noexcept {
  if (len > kU64Max - gpa) return std::unexpected(XlateError::wraps);
  const Region* r = nullptr;
  const std::size_t h = load_hint(last_hit_);
  if (h < regions_.size() &&
      contains(regions_[h].spec.guest_phys_addr, regions_[h].spec.size, gpa, 0)) {
    r = &regions_[h];
  } else {
    r = find_gpa(gpa);
    if (r == nullptr) return std::unexpected(XlateError::not_mapped);
  }
  if (len == 0) return 0;

  const Region* const end = regions_.data() + regions_.size();
  std::size_t n = 0;
  bool overflowed = false;
  for (;;) {
    const std::uint64_t off = gpa - r->spec.guest_phys_addr;
    const std::uint64_t piece = std::min(len, r->spec.size - off);
    if (n < out.size()) {
      out[n] = iovec{r->host + off, static_cast<std::size_t>(piece)};
      ++n;
    } else {
      // Keep walking so a range that is also unmapped reports not_mapped, the stronger error.
      overflowed = true;
    }
    len -= piece;
    if (len == 0) break;
    gpa += piece;  // == this region's end: no wrap since len fit before
    // The rest must start exactly at the next region (sorted, disjoint): no search needed.
    ++r;
    if (r == end || r->spec.guest_phys_addr != gpa) return std::unexpected(XlateError::not_mapped);
  }
  if (overflowed) return std::unexpected(XlateError::too_many_iov);
  return n;
}

std::uint8_t* GuestMemory::uva_to_host(std::uint64_t uva, std::uint64_t len) const noexcept {
  const std::size_t h = load_hint(last_uva_hit_);
  if (h < regions_.size()) {
    const Region& r = regions_[h];
    if (contains(r.spec.userspace_addr, r.spec.size, uva, len)) {
      return r.host + (uva - r.spec.userspace_addr);
    }
  }
  const Region* r = find_uva(uva);
  if (r == nullptr || !contains(r->spec.userspace_addr, r->spec.size, uva, len)) return nullptr;
  return r->host + (uva - r->spec.userspace_addr);
}

std::expected<std::uint64_t, XlateError> GuestMemory::uva_to_gpa(std::uint64_t uva) const noexcept {
  const std::size_t h = load_hint(last_uva_hit_);
  const Region* r = nullptr;
  if (h < regions_.size() &&
      contains(regions_[h].spec.userspace_addr, regions_[h].spec.size, uva, 0)) {
    r = &regions_[h];
  } else {
    r = find_uva(uva);
    if (r == nullptr) return std::unexpected(XlateError::not_mapped);
  }
  return r->spec.guest_phys_addr + (uva - r->spec.userspace_addr);
}

void GuestMemory::log_write(std::uint64_t gpa, std::uint64_t len) const noexcept {
  if (log_ != nullptr && len != 0) log_->mark(gpa, len);
}

void GuestMemory::log_host_write(std::span<const iovec> iov, std::size_t len) const noexcept {
  if (log_ == nullptr) return;
  for (const iovec& v : iov) {
    if (len == 0) return;
    auto hva = reinterpret_cast<std::uintptr_t>(v.iov_base);
    std::size_t left = std::min(v.iov_len, len);
    len -= left;
    // Regions do not overlap in host space, and a translated piece lies inside one region;
    // walking on from region to region also covers a piece that runs across two mappings.
    while (left != 0) {
      const Region* r = nullptr;
      for (const Region& c : regions_) {
        const auto base = reinterpret_cast<std::uintptr_t>(c.host);
        if (hva >= base && hva - base < c.spec.size) {
          r = &c;
          break;
        }
      }
      if (r == nullptr) {
        log_->count_dropped();
        break;
      }
      const std::uint64_t off = hva - reinterpret_cast<std::uintptr_t>(r->host);
      const auto k = static_cast<std::size_t>(std::min<std::uint64_t>(left, r->spec.size - off));
      log_->mark(r->spec.guest_phys_addr + off, k);
      hva += k;
      left -= k;
    }
  }
}

}  // namespace vhostkit::memory
