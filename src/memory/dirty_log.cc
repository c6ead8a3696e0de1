#include <fmt/format.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <limits>

#include "vhostkit/memory/guest_memory.h"

namespace vhostkit::memory {

DirtyLog::~DirtyLog() { detach(); }

Result<> DirtyLog::attach(UniqueFd fd, std::uint64_t size, std::uint64_t offset) {
  // fd is owned here: every early return closes it.
  if (!fd.valid()) return fail(Errc::invalid_argument, "dirty log: no fd");
  if (size == 0) return fail(Errc::invalid_argument, "dirty log: mmap_size is 0");
  if (size > std::numeric_limits<std::uint64_t>::max() - offset) {
    return fail(Errc::out_of_range,
                fmt::format("dirty log: mmap_offset {:#x} + mmap_size {:#x} wraps", offset, size));
  }
  seal_against_shrink(fd.get());  // before measuring: the size checked is one the file keeps
  struct stat st{};
  if (::fstat(fd.get(), &st) != 0) {
    return fail_errno(fmt::format("dirty log: fstat of fd {}", fd.get()));
  }
  const std::uint64_t file_size = st.st_size > 0 ? static_cast<std::uint64_t>(st.st_size) : 0;
  if (offset + size > file_size) {
    return fail(Errc::out_of_range,
                fmt::format("dirty log: mmap_offset {:#x} + mmap_size {:#x} ends past the end of "
                            "the fd ({:#x} bytes)",
                            offset, size, file_size));
  }
  // mmap wants a page-aligned offset; map from the page below and point into it.
  const auto page = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
  const std::uint64_t map_off = offset & ~(page - 1);
  const std::uint64_t delta = offset - map_off;
  const std::uint64_t map_len = (delta + size + page - 1) & ~(page - 1);  // < file_size + page
  void* base = ::mmap(nullptr, map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE,
                      fd.get(), static_cast<off_t>(map_off));
  if (base == MAP_FAILED) {
    return fail_errno(fmt::format("dirty log: mmap of {:#x} bytes at {:#x}", map_len, map_off));
  }
  detach();
  map_base_ = base;
  map_len_ = map_len;
  bits_ = static_cast<std::uint8_t*>(base) + delta;
  bytes_ = size;
  fd_ = std::move(fd);
  return {};
}

Result<> DirtyLog::attach_local(std::span<std::uint8_t> bitmap) {
  if (bitmap.empty()) return fail(Errc::invalid_argument, "dirty log: empty local bitmap");
  detach();
  bits_ = bitmap.data();
  bytes_ = bitmap.size();
  return {};
}

void DirtyLog::detach() noexcept {
  if (map_base_ != nullptr) ::munmap(map_base_, map_len_);
  map_base_ = nullptr;
  map_len_ = 0;
  bits_ = nullptr;
  bytes_ = 0;
  fd_.reset();
}

void DirtyLog::mark(std::uint64_t gpa, std::uint64_t len) noexcept {
  if (len == 0 || bits_ == nullptr) return;
  const std::uint64_t first = gpa / kPageSize;
  // A range running off the top of the address space is clamped; its tail is beyond any log.
  const std::uint64_t last_byte = len - 1 > std::numeric_limits<std::uint64_t>::max() - gpa
                                      ? std::numeric_limits<std::uint64_t>::max()
                                      : gpa + (len - 1);
  const std::uint64_t last = last_byte / kPageSize;
  const std::uint64_t pages_in_log = bytes_ * 8;  // bytes_ comes from a mapping: no overflow
  if (last >= pages_in_log) {
    std::atomic_ref<std::uint64_t>(dropped_).fetch_add(1, std::memory_order_relaxed);
    if (first >= pages_in_log) return;
  }
  const std::uint64_t end = std::min(last, pages_in_log - 1);  // inclusive, inside the bitmap
  // Other queues and the frontend's migration thread (which fetch-and-clears bytes while we run)
  // share these bytes, hence the atomic RMW. Release orders the guest-memory writes this mark
  // covers before the bit: a frontend that sees the bit and copies the page copies the new data.
  for (std::uint64_t byte = first / 8; byte <= end / 8; ++byte) {
    const std::uint64_t lo = std::max(first, byte * 8) - byte * 8;
    const std::uint64_t hi = std::min(end, byte * 8 + 7) - byte * 8;
    const auto mask = static_cast<std::uint8_t>((0xffu >> (7 - hi)) & (0xffu << lo));
    std::atomic_ref<std::uint8_t>(bits_[byte]).fetch_or(mask, std::memory_order_release);
  }
}

bool DirtyLog::is_dirty(std::uint64_t gpa) const noexcept {
  const std::uint64_t page = gpa / kPageSize;
  if (bits_ == nullptr || page / 8 >= bytes_) return false;
  return (std::atomic_ref<std::uint8_t>(bits_[page / 8]).load(std::memory_order_relaxed) >>
          (page % 8)) &
         1u;
}

}  // namespace vhostkit::memory
