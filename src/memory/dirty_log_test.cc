#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <array>
#include <limits>
#include <vector>

#include "testing/memfd.h"
#include "vhostkit/memory/guest_memory.h"

namespace vhostkit::memory {
namespace {

using testing::make_memfd;
using testing::mapping_count;
using vhostkit::testing::open_fd_count;

constexpr std::uint64_t kPage = DirtyLog::kPageSize;

TEST(DirtyLog, MarkSetsBitPageMod8OfBytePageDiv8) {
  std::array<std::uint8_t, 4> bits{};
  DirtyLog log;
  ASSERT_TRUE(log.attach_local(bits));
  log.mark(10 * kPage + 5, 1);  // page 10: byte 1, bit 2
  EXPECT_EQ(bits, (std::array<std::uint8_t, 4>{0, 0b100, 0, 0}));
  log.mark(31 * kPage, kPage);  // exactly page 31, nothing of page 32
  EXPECT_EQ(bits[3], 0x80);
  EXPECT_EQ(log.dropped(), 0u);
}

TEST(DirtyLog, RangeCrossingPagesMarksEveryPageItTouches) {
  std::array<std::uint8_t, 4> bits{};
  DirtyLog log;
  ASSERT_TRUE(log.attach_local(bits));
  log.mark(6 * kPage + 0xfff, 10 * kPage + 1);  // last byte 16 * kPage + 0xfff: pages 6 .. 16
  EXPECT_EQ(bits, (std::array<std::uint8_t, 4>{0xc0, 0xff, 0x01, 0}));
  for (std::uint64_t p = 0; p < 32; ++p) EXPECT_EQ(log.is_dirty(p * kPage), p >= 6 && p <= 16) << p;
}

TEST(DirtyLog, ZeroLengthMarksNothing) {
  std::array<std::uint8_t, 1> bits{};
  DirtyLog log;
  ASSERT_TRUE(log.attach_local(bits));
  log.mark(0, 0);
  EXPECT_EQ(bits[0], 0);
}

TEST(DirtyLog, MarkBeyondTheBitmapIsDroppedAndCountedNeverWritten) {
  // A bitmap of 2 bytes inside a larger buffer; the guard bytes after it must stay untouched.
  std::array<std::uint8_t, 8> buf{};
  DirtyLog log;
  ASSERT_TRUE(log.attach_local(std::span(buf).first(2)));
  log.mark(16 * kPage, 1);  // first page past the log
  EXPECT_EQ(log.dropped(), 1u);
  log.mark(0x7fffffff000, kPage * 100);
  EXPECT_EQ(log.dropped(), 2u);
  EXPECT_FALSE(log.is_dirty(16 * kPage));
  EXPECT_EQ(buf, (std::array<std::uint8_t, 8>{}));
}

TEST(DirtyLog, RangeRunningOffTheEndMarksTheInsidePartAndCountsTheDrop) {
  std::array<std::uint8_t, 4> buf{};
  DirtyLog log;
  ASSERT_TRUE(log.attach_local(std::span(buf).first(1)));
  log.mark(6 * kPage, 4 * kPage);  // pages 6..9; 8 and 9 are past the log
  EXPECT_EQ(buf, (std::array<std::uint8_t, 4>{0xc0, 0, 0, 0}));
  EXPECT_EQ(log.dropped(), 1u);
}

TEST(DirtyLog, WrappingRangeIsClampedNotWrapped) {
  std::array<std::uint8_t, 4> buf{};
  DirtyLog log;
  ASSERT_TRUE(log.attach_local(std::span(buf).first(1)));
  // Wrapped naively this would be pages from the top of memory round to page 0.
  log.mark(std::numeric_limits<std::uint64_t>::max() - kPage, 3 * kPage);
  EXPECT_EQ(buf, (std::array<std::uint8_t, 4>{}));
  EXPECT_EQ(log.dropped(), 1u);
}

TEST(DirtyLog, NotAttachedIgnoresMarks) {
  DirtyLog log;
  EXPECT_FALSE(log.attached());
  log.mark(0, kPage);
  EXPECT_FALSE(log.is_dirty(0));
  EXPECT_FALSE(log.attach_local({}));
}

TEST(DirtyLog, AttachFromFdIsSharedWithTheFrontend) {
  UniqueFd fd = make_memfd(0x3000);
  const int raw = ::dup(fd.get());
  DirtyLog log;
  // Offset need not be page aligned (VhostUserLog.mmap_offset is any byte).
  ASSERT_TRUE(log.attach(std::move(fd), 0x10, 0x1008));
  EXPECT_TRUE(log.attached());
  log.mark(9 * kPage, 1);  // byte 1 of the log, bit 1
  std::uint8_t got[2] = {};
  ASSERT_EQ(::pread(raw, got, 2, 0x1008), 2);
  EXPECT_EQ(got[0], 0);
  EXPECT_EQ(got[1], 0b10);
  log.mark(0x10 * 8 * kPage, 1);  // one page past the 16-byte log
  EXPECT_EQ(log.dropped(), 1u);
  std::uint8_t after = 0xee;
  ASSERT_EQ(::pread(raw, &after, 1, 0x1018), 1);
  EXPECT_EQ(after, 0);
  ::close(raw);
}

TEST(DirtyLog, AttachRejectsSizePastTheFile) {
  DirtyLog log;
  auto r = log.attach(make_memfd(0x1000), 0x800, 0x900);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, Errc::out_of_range);
  EXPECT_EQ(r.error().detail,
            "dirty log: mmap_offset 0x900 + mmap_size 0x800 ends past the end of the fd (0x1000 "
            "bytes)");
  EXPECT_FALSE(log.attached());
}

TEST(DirtyLog, AttachRejectsOffsetPlusSizeWrap) {
  DirtyLog log;
  auto r =
      log.attach(make_memfd(0x1000), 0x2000, std::numeric_limits<std::uint64_t>::max() - 0xfff);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, Errc::out_of_range);
  EXPECT_NE(r.error().detail.find("wraps"), std::string::npos);
}

TEST(DirtyLog, AttachRejectsBadFdAndZeroSize) {
  DirtyLog log;
  EXPECT_EQ(log.attach(UniqueFd(), 0x10, 0).error().code, Errc::invalid_argument);
  int n = ::dup(0);
  ::close(n);
  auto r = log.attach(UniqueFd(n), 0x10, 0);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, Errc::system);
  EXPECT_EQ(r.error().sys_errno, EBADF);
  EXPECT_EQ(log.attach(make_memfd(0x1000), 0, 0).error().code, Errc::invalid_argument);
  EXPECT_FALSE(log.attached());
}

TEST(DirtyLog, DetachAndReattachLeakNothing) {
  const std::size_t fds0 = open_fd_count();
  const std::size_t maps0 = mapping_count();
  {
    DirtyLog log;
    ASSERT_TRUE(log.attach(make_memfd(0x2000), 0x1000, 0));
    ASSERT_TRUE(log.attach(make_memfd(0x2000), 0x1000, 0x1000));  // replaces the first
    EXPECT_EQ(open_fd_count(), fds0 + 1);
    ASSERT_FALSE(log.attach(make_memfd(0x1000), 0x2000, 0));  // failure keeps the current log
    EXPECT_TRUE(log.attached());
    EXPECT_EQ(open_fd_count(), fds0 + 1);
    log.detach();
    EXPECT_FALSE(log.attached());
    EXPECT_EQ(open_fd_count(), fds0);
    EXPECT_EQ(mapping_count(), maps0);
    ASSERT_TRUE(log.attach(make_memfd(0x1000), 0x1000, 0));
  }
  EXPECT_EQ(open_fd_count(), fds0);
  EXPECT_EQ(mapping_count(), maps0);
}

// A chain's writable pieces, as host addresses the table translated, marked by what the device
// wrote (the used length): two regions, gpa 0x10000.. and 0x100000.., each 16 pages.
TEST(DirtyLog, HostWritesAreMarkedAtTheirGuestPages) {
  std::vector<std::uint8_t> a(16 * kPage), b(16 * kPage);
  GuestMemory mem;
  ASSERT_TRUE(mem.add_local_region({0x10000, 16 * kPage, 0x7000'0000, 0}, a.data()));
  ASSERT_TRUE(mem.add_local_region({0x100000, 16 * kPage, 0x9000'0000, 0}, b.data()));
  std::array<std::uint8_t, 64> bits{};
  DirtyLog log;
  ASSERT_TRUE(log.attach_local(bits));
  mem.set_dirty_log(&log);
  const iovec iov[] = {{a.data() + 3 * kPage + 10, 100},       // gpa page 0x13
                       {b.data() + 5 * kPage - 1, 2 * kPage},  // pages 0x104 .. 0x106
                       {a.data() + 9 * kPage, kPage}};         // past the used length
  mem.log_host_write(iov, 100 + 2 * kPage);
  for (std::uint64_t p = 0; p < 64 * 8; ++p) {
    const bool want = p == 0x13 || (p >= 0x104 && p <= 0x106);
    EXPECT_EQ(log.is_dirty(p * kPage), want) << "page " << p;
  }
  EXPECT_EQ(log.dropped(), 0u);
}

TEST(DirtyLog, HostWriteOutsideTheTableIsCountedNotMarked) {
  std::vector<std::uint8_t> a(4 * kPage);
  std::array<std::uint8_t, 8> other{};
  GuestMemory mem;
  ASSERT_TRUE(mem.add_local_region({0, 4 * kPage, 0x7000'0000, 0}, a.data()));
  std::array<std::uint8_t, 8> bits{};
  DirtyLog log;
  ASSERT_TRUE(log.attach_local(bits));
  mem.set_dirty_log(&log);
  const iovec iov[] = {{other.data(), other.size()}};
  mem.log_host_write(iov, other.size());
  EXPECT_EQ(log.dropped(), 1u);
  EXPECT_EQ(bits, (std::array<std::uint8_t, 8>{}));
}

TEST(DirtyLog, HostWriteWithoutALogDoesNothing) {
  std::vector<std::uint8_t> a(kPage);
  GuestMemory mem;
  ASSERT_TRUE(mem.add_local_region({0, kPage, 0x7000'0000, 0}, a.data()));
  const iovec iov[] = {{a.data(), 10}};
  mem.log_host_write(iov, 10);  // no log attached: must not crash or mark
  EXPECT_EQ(mem.dirty_log(), nullptr);
}

// The log's file, where it takes seals, is sealed against shrinking by the peer under the
// mapping (marks past a new end would be SIGBUS).
TEST(DirtyLog, SealableLogFileCannotShrinkUnderTheMapping) {
  UniqueFd fd(::memfd_create("vhostkit-test", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  ASSERT_TRUE(fd.valid());
  ASSERT_EQ(::ftruncate(fd.get(), 4096), 0);
  UniqueFd peer(::dup(fd.get()));
  DirtyLog log;
  ASSERT_TRUE(log.attach(std::move(fd), 4096, 0));
  errno = 0;
  EXPECT_NE(::ftruncate(peer.get(), 0), 0);
  EXPECT_EQ(errno, EPERM);
  log.mark(4095 * 8 * DirtyLog::kPageSize, 1);  // the log's last byte
  EXPECT_TRUE(log.is_dirty(4095 * 8 * DirtyLog::kPageSize));
}

}  // namespace
}  // namespace vhostkit::memory
