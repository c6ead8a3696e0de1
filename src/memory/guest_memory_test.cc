#include "vhostkit/memory/guest_memory.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <array>
#include <cstring>
#include <limits>
#include <vector>

#include "testing/memfd.h"

namespace vhostkit::memory {
namespace {

using testing::dup_fd;
using testing::make_memfd;
using testing::mapping_count;
using vhostkit::testing::is_mapping_start;
using vhostkit::testing::open_fd_count;

constexpr std::uint64_t kU64Max = std::numeric_limits<std::uint64_t>::max();
constexpr std::uint64_t kPage = 0x1000;

RegionSpec spec(std::uint64_t gpa, std::uint64_t size, std::uint64_t uva,
                std::uint64_t offset = 0) {
  return RegionSpec{gpa, size, uva, offset};
}

// A memfd-backed table: one region per call, each over its own memfd.
struct Table {
  GuestMemory mem;
  Result<> add(const RegionSpec& s, std::uint64_t file_size = 0) {
    return mem.add_region(s, make_memfd(file_size ? file_size : s.mmap_offset + s.size));
  }
};

bool fd_is_open(int fd) { return ::fcntl(fd, F_GETFD) != -1; }

// --- add_region validation: one test per rule --------------------------------------------------

TEST(GuestMemoryAdd, RejectsZeroSize) {
  Table t;
  auto r = t.mem.add_region(spec(0x1000, 0, 0x7f0000000000), make_memfd(kPage));
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, Errc::invalid_argument);
  EXPECT_EQ(r.error().detail, "region gpa 0x1000 has size 0");
  EXPECT_EQ(t.mem.region_count(), 0u);
}

TEST(GuestMemoryAdd, RejectsGpaWrap) {
  Table t;
  auto r = t.mem.add_region(spec(kU64Max - 0xfff, 0x2000, 0x10000), make_memfd(0x2000));
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, Errc::out_of_range);
  EXPECT_NE(r.error().detail.find("gpa 0xfffffffffffff000 size 0x2000 wraps"), std::string::npos)
      << r.error().detail;
  EXPECT_EQ(t.mem.region_count(), 0u);
}

TEST(GuestMemoryAdd, RejectsUvaWrap) {
  Table t;
  auto r = t.mem.add_region(spec(0, 0x2000, kU64Max - 0xfff), make_memfd(0x2000));
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, Errc::out_of_range);
  EXPECT_NE(r.error().detail.find("uva 0xfffffffffffff000 size 0x2000 wraps"), std::string::npos)
      << r.error().detail;
}

TEST(GuestMemoryAdd, RejectsMmapOffsetWrap) {
  Table t;
  auto r = t.mem.add_region(spec(0, 0x2000, 0x10000, kU64Max - 0xfff), make_memfd(0x2000));
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, Errc::out_of_range);
  EXPECT_NE(r.error().detail.find("mmap_offset 0xfffffffffffff000 size 0x2000 wraps"),
            std::string::npos)
      << r.error().detail;
}

TEST(GuestMemoryAdd, RejectsOffsetPlusSizePastEndOfFile) {
  Table t;
  auto r = t.mem.add_region(spec(0, 0x2000, 0x10000, 0x1000), make_memfd(0x2000));
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, Errc::out_of_range);
  EXPECT_NE(r.error().detail.find("mmap_offset 0x1000 + size ends at 0x3000, past the end of the "
                                  "fd (0x2000 bytes)"),
            std::string::npos)
      << r.error().detail;
  // Exactly to the end is fine.
  EXPECT_TRUE(t.mem.add_region(spec(0, 0x1000, 0x10000, 0x1000), make_memfd(0x2000)));
}

TEST(GuestMemoryAdd, RejectsGpaOverlap) {
  Table t;
  ASSERT_TRUE(t.add(spec(0x2000, 0x1000, 0x100000)));
  auto r = t.add(spec(0x1000, 0x2000, 0x200000));
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, Errc::overlap);
  EXPECT_EQ(r.error().detail,
            "region gpa 0x1000 size 0x2000 overlaps region gpa 0x2000 size 0x1000");
  // Overlap with the region below the insertion point too.
  r = t.add(spec(0x2fff, 0x1000, 0x300000));
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, Errc::overlap);
  EXPECT_EQ(t.mem.region_count(), 1u);
  // Touching is not overlapping.
  EXPECT_TRUE(t.add(spec(0x1000, 0x1000, 0x200000)));
  EXPECT_TRUE(t.add(spec(0x3000, 0x1000, 0x300000)));
}

TEST(GuestMemoryAdd, RejectsUvaOverlap) {
  Table t;
  ASSERT_TRUE(t.add(spec(0x0, 0x2000, 0x7f0000001000)));
  auto r = t.add(spec(0x100000, 0x1000, 0x7f0000002000));
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, Errc::overlap);
  EXPECT_EQ(r.error().detail,
            "region uva 0x7f0000002000 size 0x1000 overlaps region uva 0x7f0000001000 size 0x2000 "
            "(gpa 0x0)");
  r = t.add(spec(0x100000, 0x2000, 0x7f0000000000));  // from below
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, Errc::overlap);
  EXPECT_EQ(t.mem.region_count(), 1u);
}

TEST(GuestMemoryAdd, SlotLimitRefusesThe510thRegion) {
  Table t;
  UniqueFd base = make_memfd(kPage);
  ASSERT_TRUE(base.valid());
  for (std::uint64_t i = 0; i < GuestMemory::kMaxRegions; ++i) {
    // Every other page, so no two regions are adjacent.
    ASSERT_TRUE(
        t.mem.add_region(spec(i * 2 * kPage, kPage, 0x10000000 + i * 2 * kPage), dup_fd(base)))
        << i;
  }
  EXPECT_EQ(t.mem.region_count(), 509u);
  UniqueFd extra = dup_fd(base);
  const int extra_no = extra.get();
  auto r = t.mem.add_region(spec(0x10000000, kPage, 0x20000000), std::move(extra));
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, Errc::too_many);
  EXPECT_NE(r.error().detail.find("509 regions (max 509)"), std::string::npos) << r.error().detail;
  EXPECT_FALSE(fd_is_open(extra_no));
  EXPECT_EQ(t.mem.region_count(), 509u);
  // Every one of them is found (binary search over a full table).
  for (std::uint64_t i = 0; i < GuestMemory::kMaxRegions; i += 37) {
    EXPECT_EQ(t.mem.gpa_to_host(i * 2 * kPage + 5, 1), t.mem.regions()[i].host + 5) << i;
    EXPECT_EQ(t.mem.gpa_to_host((i * 2 + 1) * kPage, 0), nullptr) << i;
  }
}

TEST(GuestMemoryAdd, RejectsInvalidFd) {
  Table t;
  auto r = t.mem.add_region(spec(0, kPage, 0x10000), UniqueFd());
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, Errc::invalid_argument);
  EXPECT_EQ(t.mem.region_count(), 0u);
}

TEST(GuestMemoryAdd, RejectsClosedFdNumber) {
  Table t;
  int n = ::dup(0);
  ASSERT_GE(n, 0);
  ::close(n);  // a number that no longer names a file
  auto r = t.mem.add_region(spec(0, kPage, 0x10000), UniqueFd(n));
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, Errc::system);
  EXPECT_EQ(r.error().sys_errno, EBADF);
  EXPECT_EQ(t.mem.region_count(), 0u);
}

TEST(GuestMemoryAdd, FailureClosesFdAndLeavesTableUnchanged) {
  Table t;
  ASSERT_TRUE(t.add(spec(0, 0x2000, 0x10000)));
  const auto before = t.mem.regions()[0].host;
  UniqueFd fd = make_memfd(0x2000);
  const int no = fd.get();
  ASSERT_FALSE(t.mem.add_region(spec(0x1000, 0x2000, 0x50000), std::move(fd)));
  EXPECT_FALSE(fd_is_open(no));
  ASSERT_EQ(t.mem.region_count(), 1u);
  EXPECT_EQ(t.mem.regions()[0].host, before);
  EXPECT_EQ(t.mem.regions()[0].spec.guest_phys_addr, 0u);
}

TEST(GuestMemoryAdd, LocalRegionIsValidatedTheSameWay) {
  GuestMemory mem;
  std::vector<std::uint8_t> buf(0x2000);
  ASSERT_TRUE(mem.add_local_region(spec(0x1000, 0x2000, 0x90000), buf.data()));
  EXPECT_EQ(mem.add_local_region(spec(0x2000, 0x1000, 0xa0000), buf.data()).error().code,
            Errc::overlap);
  EXPECT_EQ(mem.add_local_region(spec(0x8000, 0, 0xa0000), buf.data()).error().code,
            Errc::invalid_argument);
  EXPECT_EQ(mem.add_local_region(spec(0x8000, 0x1000, 0xa0000), nullptr).error().code,
            Errc::invalid_argument);
  EXPECT_EQ(mem.gpa_to_host(0x1000, 0x2000), buf.data());
  EXPECT_EQ(mem.region_count(), 1u);
}

// --- translation ---------------------------------------------------------------------------------

TEST(GuestMemoryXlate, RegionEdges) {
  Table t;
  ASSERT_TRUE(t.add(spec(0x10000, 0x4000, 0x7f0000000000)));
  std::uint8_t* host = t.mem.regions()[0].host;
  ASSERT_NE(host, nullptr);
  EXPECT_EQ(t.mem.gpa_to_host(0x10000, 1), host);           // first byte
  EXPECT_EQ(t.mem.gpa_to_host(0x13fff, 1), host + 0x3fff);  // last byte
  EXPECT_EQ(t.mem.gpa_to_host(0x14000, 1), nullptr);        // one past
  EXPECT_EQ(t.mem.gpa_to_host(0xffff, 1), nullptr);         // one before
  EXPECT_EQ(t.mem.gpa_to_host(0x10000, 0x4000), host);      // whole region
  EXPECT_EQ(t.mem.gpa_to_host(0x10000, 0x4001), nullptr);   // one byte too long
  EXPECT_EQ(t.mem.gpa_to_host(0x13000, 0x1001), nullptr);   // runs off the end
  // The memory really is there: write the last byte.
  host[0x3fff] = 0xab;
  EXPECT_EQ(*t.mem.gpa_to_host(0x13fff, 1), 0xab);
}

TEST(GuestMemoryXlate, ZeroLengthChecksOnlyTheAddress) {
  Table t;
  ASSERT_TRUE(t.add(spec(0x10000, 0x1000, 0x7f0000000000)));
  EXPECT_EQ(t.mem.gpa_to_host(0x10fff, 0), t.mem.regions()[0].host + 0xfff);
  EXPECT_EQ(t.mem.gpa_to_host(0x11000, 0), nullptr);
  std::array<iovec, 1> iov{};
  EXPECT_EQ(t.mem.gpa_to_iovec(0x10fff, 0, iov), 0u);
  EXPECT_EQ(t.mem.gpa_to_iovec(0x11000, 0, iov).error(), XlateError::not_mapped);
  EXPECT_EQ(t.mem.uva_to_host(0x7f0000000fff, 0), t.mem.regions()[0].host + 0xfff);
  EXPECT_EQ(t.mem.uva_to_host(0x7f0000001000, 0), nullptr);
}

TEST(GuestMemoryXlate, WrappingRangeIsRejected) {
  GuestMemory mem;
  std::vector<std::uint8_t> buf(0x1000);
  ASSERT_TRUE(mem.add_local_region(spec(0x1000, 0x1000, 0x9000), buf.data()));
  std::array<iovec, 4> iov{};
  EXPECT_EQ(mem.gpa_to_iovec(0x1000, kU64Max, iov).error(), XlateError::wraps);
  EXPECT_EQ(mem.gpa_to_iovec(kU64Max, 2, iov).error(), XlateError::wraps);
  EXPECT_EQ(mem.gpa_to_host(0x1800, kU64Max - 0x7ff), nullptr);
  EXPECT_EQ(mem.uva_to_host(0x9800, kU64Max - 0x7ff), nullptr);
}

TEST(GuestMemoryXlate, MmapOffsetSelectsTheRightBytesOfTheFd) {
  GuestMemory mem;
  UniqueFd fd = make_memfd(0x3000);
  const char msg[] = "at offset 0x1800";
  ASSERT_EQ(::pwrite(fd.get(), msg, sizeof msg, 0x1800), static_cast<ssize_t>(sizeof msg));
  // An mmap_offset that is not page aligned: the region starts mid-page in the file.
  ASSERT_TRUE(mem.add_region(spec(0x40000, 0x1000, 0x50000, 0x1800), std::move(fd)));
  EXPECT_EQ(std::memcmp(mem.gpa_to_host(0x40000, sizeof msg), msg, sizeof msg), 0);
  EXPECT_EQ(mem.regions()[0].map_len % static_cast<std::size_t>(::sysconf(_SC_PAGESIZE)), 0u);
}

TEST(GuestMemoryXlate, SharedMappingIsVisibleThroughAnotherMapping) {
  GuestMemory mem;
  UniqueFd fd = make_memfd(0x2000);
  // The "frontend's" own view of the same memory.
  void* other = ::mmap(nullptr, 0x2000, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
  ASSERT_NE(other, MAP_FAILED);
  ASSERT_TRUE(mem.add_region(spec(0x0, 0x2000, 0x7f0000000000), std::move(fd)));
  std::uint8_t* host = mem.gpa_to_host(0x1234, 4);
  ASSERT_NE(host, nullptr);
  ASSERT_NE(static_cast<void*>(host), static_cast<std::uint8_t*>(other) + 0x1234);
  std::memcpy(host, "ring", 4);
  EXPECT_EQ(std::memcmp(static_cast<std::uint8_t*>(other) + 0x1234, "ring", 4), 0);
  std::memcpy(static_cast<std::uint8_t*>(other) + 0x10, "back", 4);
  EXPECT_EQ(std::memcmp(mem.gpa_to_host(0x10, 4), "back", 4), 0);
  ::munmap(other, 0x2000);
}

TEST(GuestMemoryXlate, RangeSpanningTwoAdjacentRegionsGivesTwoPieces) {
  Table t;
  // Added out of order, different fds, unrelated uvas: adjacency is in gpa space only.
  ASSERT_TRUE(t.add(spec(0x3000, 0x2000, 0x7f0000100000)));
  ASSERT_TRUE(t.add(spec(0x1000, 0x2000, 0x7f0000900000)));
  const auto& lo = t.mem.regions()[0];
  const auto& hi = t.mem.regions()[1];
  ASSERT_EQ(lo.spec.guest_phys_addr, 0x1000u);
  std::array<iovec, 4> iov{};
  auto n = t.mem.gpa_to_iovec(0x2800, 0x1000, iov);
  ASSERT_TRUE(n);
  ASSERT_EQ(*n, 2u);
  EXPECT_EQ(iov[0].iov_base, lo.host + 0x1800);
  EXPECT_EQ(iov[0].iov_len, 0x800u);
  EXPECT_EQ(iov[1].iov_base, hi.host);
  EXPECT_EQ(iov[1].iov_len, 0x800u);
  // The single-region fast path declines it.
  EXPECT_EQ(t.mem.gpa_to_host(0x2800, 0x1000), nullptr);
  // Inside one region it is one piece.
  n = t.mem.gpa_to_iovec(0x3000, 0x2000, iov);
  ASSERT_TRUE(n);
  EXPECT_EQ(*n, 1u);
  EXPECT_EQ(iov[0].iov_base, hi.host);
  EXPECT_EQ(iov[0].iov_len, 0x2000u);
  // Both regions whole; then one byte more is unmapped.
  n = t.mem.gpa_to_iovec(0x1000, 0x4000, iov);
  ASSERT_TRUE(n);
  EXPECT_EQ(*n, 2u);
  EXPECT_EQ(t.mem.gpa_to_iovec(0x1000, 0x4001, iov).error(), XlateError::not_mapped);
}

TEST(GuestMemoryXlate, GapBetweenRegionsIsNotMapped) {
  Table t;
  ASSERT_TRUE(t.add(spec(0x1000, 0x1000, 0x100000)));
  ASSERT_TRUE(t.add(spec(0x3000, 0x1000, 0x200000)));
  std::array<iovec, 4> iov{};
  EXPECT_EQ(t.mem.gpa_to_iovec(0x1800, 0x2000, iov).error(), XlateError::not_mapped);
  EXPECT_EQ(t.mem.gpa_to_iovec(0x2000, 1, iov).error(), XlateError::not_mapped);
  EXPECT_EQ(t.mem.gpa_to_host(0x2000, 1), nullptr);
  EXPECT_EQ(t.mem.gpa_to_host(0x2fff, 2), nullptr);
  EXPECT_NE(t.mem.gpa_to_host(0x3000, 1), nullptr);
}

TEST(GuestMemoryXlate, TooSmallIovecArray) {
  Table t;
  ASSERT_TRUE(t.add(spec(0x1000, 0x1000, 0x100000)));
  ASSERT_TRUE(t.add(spec(0x2000, 0x1000, 0x200000)));
  ASSERT_TRUE(t.add(spec(0x3000, 0x1000, 0x300000)));
  std::array<iovec, 2> iov{};
  EXPECT_EQ(t.mem.gpa_to_iovec(0x1000, 0x3000, iov).error(), XlateError::too_many_iov);
  EXPECT_EQ(t.mem.gpa_to_iovec(0x1000, 0x3000, std::span<iovec>{}).error(),
            XlateError::too_many_iov);
  EXPECT_EQ(t.mem.gpa_to_iovec(0x1000, 0x2000, iov), 2u);
  // Unmapped beats too small: the range is bad whatever the array.
  EXPECT_EQ(t.mem.gpa_to_iovec(0x1000, 0x3001, iov).error(), XlateError::not_mapped);
}

TEST(GuestMemoryXlate, UvaTranslation) {
  Table t;
  ASSERT_TRUE(t.add(spec(0x0, 0x2000, 0x7f0000200000)));
  ASSERT_TRUE(t.add(spec(0x100000, 0x1000, 0x7f0000100000)));
  const auto& r0 = t.mem.regions()[0];
  const auto& r1 = t.mem.regions()[1];
  EXPECT_EQ(t.mem.uva_to_host(0x7f0000200000, 0x2000), r0.host);
  EXPECT_EQ(t.mem.uva_to_host(0x7f0000201fff, 1), r0.host + 0x1fff);
  EXPECT_EQ(t.mem.uva_to_host(0x7f0000202000, 1), nullptr);
  EXPECT_EQ(t.mem.uva_to_host(0x7f0000201000, 0x1001), nullptr);
  EXPECT_EQ(t.mem.uva_to_host(0x7f0000100010, 0x10), r1.host + 0x10);
  EXPECT_EQ(t.mem.uva_to_host(0x7f00000fffff, 1), nullptr);
  // The same byte by gpa and by uva.
  EXPECT_EQ(t.mem.uva_to_host(0x7f0000100800, 1), t.mem.gpa_to_host(0x100800, 1));
}

TEST(GuestMemoryXlate, UvaToGpa) {
  Table t;
  ASSERT_TRUE(t.add(spec(0x0, 0x2000, 0x7f0000200000)));
  ASSERT_TRUE(t.add(spec(0x100000, 0x1000, 0x7f0000100000)));
  EXPECT_EQ(t.mem.uva_to_gpa(0x7f0000200000), 0x0u);
  EXPECT_EQ(t.mem.uva_to_gpa(0x7f0000201fff), 0x1fffu);
  EXPECT_EQ(t.mem.uva_to_gpa(0x7f0000100abc), 0x100abcu);
  EXPECT_EQ(t.mem.uva_to_gpa(0x7f0000202000).error(), XlateError::not_mapped);
  EXPECT_EQ(t.mem.uva_to_gpa(0).error(), XlateError::not_mapped);
}

TEST(GuestMemoryXlate, EmptyTableTranslatesNothing) {
  GuestMemory mem;
  std::array<iovec, 1> iov{};
  EXPECT_EQ(mem.gpa_to_host(0, 0), nullptr);
  EXPECT_EQ(mem.gpa_to_iovec(0, 1, iov).error(), XlateError::not_mapped);
  EXPECT_EQ(mem.uva_to_host(0, 0), nullptr);
  EXPECT_EQ(mem.uva_to_gpa(0).error(), XlateError::not_mapped);
}

// --- remove / clear / move ----------------------------------------------------------------------

TEST(GuestMemoryRemove, RemovesOnlyTheExactMatch) {
  Table t;
  ASSERT_TRUE(t.add(spec(0x1000, 0x1000, 0x100000)));
  ASSERT_TRUE(t.add(spec(0x2000, 0x1000, 0x200000)));
  auto r = t.mem.remove_region(spec(0x1000, 0x2000, 0x100000));  // wrong size
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, Errc::not_mapped);
  EXPECT_EQ(r.error().detail, "no region gpa 0x1000 size 0x2000 uva 0x100000 to remove");
  EXPECT_FALSE(t.mem.remove_region(spec(0x1000, 0x1000, 0x200000)));  // wrong uva
  EXPECT_EQ(t.mem.region_count(), 2u);
  ASSERT_TRUE(t.mem.remove_region(spec(0x1000, 0x1000, 0x100000)));
  ASSERT_EQ(t.mem.region_count(), 1u);
  EXPECT_EQ(t.mem.gpa_to_host(0x1000, 1), nullptr);
  EXPECT_EQ(t.mem.uva_to_host(0x100000, 1), nullptr);
  EXPECT_NE(t.mem.gpa_to_host(0x2000, 1), nullptr);
  EXPECT_NE(t.mem.uva_to_host(0x200000, 1), nullptr);
  // The freed space can be reused.
  EXPECT_TRUE(t.add(spec(0x1000, 0x1000, 0x100000)));
}

TEST(GuestMemoryRemove, RemoveAndClearLeakNoFdsNorMappings) {
  const std::size_t fds0 = open_fd_count();
  const std::size_t maps0 = mapping_count();
  std::vector<void*> bases;
  {
    Table t;
    for (std::uint64_t i = 0; i < 8; ++i) {
      ASSERT_TRUE(t.add(spec(i * 0x10000, 0x3000, 0x100000 + i * 0x10000)));
    }
    // A failed add must not leak either.
    ASSERT_FALSE(t.add(spec(0, 0x1000, 0x900000)));
    for (const auto& r : t.mem.regions()) bases.push_back(r.map_base);
    EXPECT_EQ(open_fd_count(), fds0 + 8);
    EXPECT_GE(mapping_count(), maps0 + 8);
    ASSERT_TRUE(t.mem.remove_region(spec(0x30000, 0x3000, 0x130000)));
    EXPECT_FALSE(is_mapping_start(bases[3]));
    EXPECT_EQ(open_fd_count(), fds0 + 7);
    t.mem.clear();
    EXPECT_EQ(t.mem.region_count(), 0u);
    EXPECT_EQ(t.mem.gpa_to_host(0, 1), nullptr);
    EXPECT_EQ(open_fd_count(), fds0);
    EXPECT_EQ(mapping_count(), maps0);
    for (void* b : bases) EXPECT_FALSE(is_mapping_start(b));
    // The destructor after clear() and re-adding.
    ASSERT_TRUE(t.add(spec(0, 0x1000, 0x100000)));
  }
  EXPECT_EQ(open_fd_count(), fds0);
  EXPECT_EQ(mapping_count(), maps0);
}

TEST(GuestMemoryMove, MoveTransfersRegionsAndEmptiesTheSource) {
  const std::size_t fds0 = open_fd_count();
  GuestMemory a;
  ASSERT_TRUE(a.add_region(spec(0, 0x1000, 0x100000), make_memfd(0x1000)));
  std::uint8_t* host = a.gpa_to_host(0, 1);
  GuestMemory b(std::move(a));
  EXPECT_EQ(b.gpa_to_host(0, 1), host);
  EXPECT_EQ(a.gpa_to_host(0, 1), nullptr);  // NOLINT(bugprone-use-after-move): defined empty
  GuestMemory c;
  ASSERT_TRUE(c.add_region(spec(0, 0x1000, 0x100000), make_memfd(0x1000)));
  c = std::move(b);  // c's own region is unmapped and its fd closed
  EXPECT_EQ(c.gpa_to_host(0, 1), host);
  EXPECT_EQ(open_fd_count(), fds0 + 1);
  c.clear();
  EXPECT_EQ(open_fd_count(), fds0);
}

TEST(GuestMemoryHint, StaleHintAfterRemovalIsHarmless) {
  Table t;
  for (std::uint64_t i = 0; i < 4; ++i)
    ASSERT_TRUE(t.add(spec(i * 0x2000, 0x1000, 0x100000 + i * 0x2000)));
  EXPECT_NE(t.mem.gpa_to_host(0x6000, 1), nullptr);  // hint -> last region
  EXPECT_NE(t.mem.uva_to_host(0x106000, 1), nullptr);
  ASSERT_TRUE(t.mem.remove_region(spec(0x6000, 0x1000, 0x106000)));
  EXPECT_EQ(t.mem.gpa_to_host(0x6000, 1), nullptr);
  EXPECT_EQ(t.mem.uva_to_host(0x106000, 1), nullptr);
  EXPECT_EQ(t.mem.gpa_to_host(0x4000, 1), t.mem.regions()[2].host);
  // Alternate between regions so the hint keeps moving.
  for (int k = 0; k < 3; ++k) {
    for (std::size_t i = 0; i < 3; ++i) {
      EXPECT_EQ(t.mem.gpa_to_host(i * 0x2000 + 7, 1), t.mem.regions()[i].host + 7);
      EXPECT_EQ(t.mem.uva_to_gpa(0x100000 + i * 0x2000 + 7), i * 0x2000 + 7);
    }
  }
}

// --- dirty logging through GuestMemory ----------------------------------------------------------

TEST(GuestMemoryLog, LogWriteMarksPagesOnlyWhenALogIsAttached) {
  GuestMemory mem;
  mem.log_write(0x1000, 0x10);  // no log: nothing to do, no crash
  std::array<std::uint8_t, 4> bits{};
  DirtyLog log;
  ASSERT_TRUE(log.attach_local(bits));
  mem.set_dirty_log(&log);
  EXPECT_EQ(mem.dirty_log(), &log);
  mem.log_write(0x3000, 0);  // len 0 marks nothing
  EXPECT_EQ(bits, (std::array<std::uint8_t, 4>{}));
  mem.log_write(0x2fff, 2);  // pages 2 and 3
  EXPECT_EQ(bits[0], 0b1100);
  EXPECT_TRUE(log.is_dirty(0x2000));
  EXPECT_TRUE(log.is_dirty(0x3fff));
  EXPECT_FALSE(log.is_dirty(0x4000));
  mem.set_dirty_log(nullptr);
  mem.log_write(0x10000, 1);
  EXPECT_FALSE(log.is_dirty(0x10000));
}

// --- a peer shrinking a region's file under the mapping ------------------------------------------
// An access past the file's new end would be a SIGBUS. A file that takes seals is sealed
// against shrinking when its region is added; the peer may still grow it.
TEST(GuestMemoryHostile, SealableRegionFileCannotShrinkUnderTheMapping) {
  UniqueFd fd(::memfd_create("vhostkit-test", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  ASSERT_TRUE(fd.valid());
  ASSERT_EQ(::ftruncate(fd.get(), 2 * kPage), 0);
  UniqueFd peer = dup_fd(fd);
  GuestMemory mem;
  ASSERT_TRUE(mem.add_region(spec(0, 2 * kPage, 0x10000), std::move(fd)));
  EXPECT_NE(::fcntl(peer.get(), F_GET_SEALS) & F_SEAL_SHRINK, 0);
  errno = 0;
  EXPECT_NE(::ftruncate(peer.get(), 0), 0);
  EXPECT_EQ(errno, EPERM);
  EXPECT_EQ(::ftruncate(peer.get(), 4 * kPage), 0);  // growing is still the peer's to do
  auto* last = static_cast<volatile std::uint8_t*>(mem.gpa_to_host(2 * kPage - 1, 1));
  ASSERT_NE(last, nullptr);
  *last = 7;  // no SIGBUS: the mapped range is still inside the file
  EXPECT_EQ(*last, 7);
}

// A file that takes no seals (a memfd made without MFD_ALLOW_SEALING, a hugetlbfs file) is
// mapped as it is: the gap docs/security.md names.
TEST(GuestMemoryHostile, UnsealableRegionFileIsStillTaken) {
  UniqueFd fd = make_memfd(kPage);
  EXPECT_FALSE(seal_against_shrink(fd.get()));
  GuestMemory mem;
  EXPECT_TRUE(mem.add_region(spec(0, kPage, 0x10000), std::move(fd)));
}

}  // namespace
}  // namespace vhostkit::memory
