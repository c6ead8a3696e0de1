// A dirty log as a front-end hands it over (SET_LOG_BASE): a memfd bitmap, one bit per 4 KiB
// guest page, that the test maps too and reads back. For the dirty-logging tests of the vhost,
// net and blk devices.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "vhostkit/unique_fd.h"

namespace vhostkit::testing {

class SharedLog {
 public:
  static constexpr std::uint64_t kPage = 4096;

  // `bytes` of bitmap cover bytes * 8 pages of guest memory (4096 bytes: 128 MiB).
  explicit SharedLog(std::size_t bytes = 4096) : bytes_(bytes) {
    fd_ = UniqueFd(::memfd_create("vhostkit-test-log", MFD_CLOEXEC));
    if (!fd_.valid() || ::ftruncate(fd_.get(), static_cast<off_t>(bytes)) != 0) return;
    void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd_.get(), 0);
    if (p != MAP_FAILED) bits_ = static_cast<std::uint8_t*>(p);
  }
  ~SharedLog() {
    if (bits_ != nullptr) ::munmap(bits_, bytes_);
  }
  SharedLog(const SharedLog&) = delete;
  SharedLog& operator=(const SharedLog&) = delete;

  bool ok() const noexcept { return bits_ != nullptr; }
  std::size_t size() const noexcept { return bytes_; }
  // A descriptor of the bitmap to hand to the device (set_log_base takes ownership).
  UniqueFd fd() const { return UniqueFd(::dup(fd_.get())); }

  bool dirty(std::uint64_t gpa) const noexcept {
    const std::uint64_t page = gpa / kPage;
    return page / 8 < bytes_ && ((bits_[page / 8] >> (page % 8)) & 1) != 0;
  }
  // Every page of [gpa, gpa + len) dirty.
  bool all_dirty(std::uint64_t gpa, std::uint64_t len) const noexcept {
    for (std::uint64_t p = gpa / kPage; p <= (gpa + len - 1) / kPage; ++p) {
      if (!dirty(p * kPage)) return false;
    }
    return true;
  }
  // What a front-end's migration thread does when it has copied the pages.
  void clear() noexcept { std::memset(bits_, 0, bytes_); }

 private:
  std::size_t bytes_;
  UniqueFd fd_;
  std::uint8_t* bits_ = nullptr;
};

}  // namespace vhostkit::testing
