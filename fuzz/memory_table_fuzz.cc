// Fuzzes the guest memory table the way a hostile frontend would drive it: a byte stream of
// operations (add/remove regions with arbitrary specs, translations, log marks), checking after
// each that whatever the table hands out lies inside a live region and agrees with a naive
// linear-scan model.
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "vhostkit/memory/guest_memory.h"

namespace {

using vhostkit::UniqueFd;
using vhostkit::memory::DirtyLog;
using vhostkit::memory::GuestMemory;
using vhostkit::memory::Region;
using vhostkit::memory::RegionSpec;
using vhostkit::memory::XlateError;

constexpr std::uint64_t kFileSize = 64 * 1024;
constexpr std::uint64_t kU64Max = std::numeric_limits<std::uint64_t>::max();

void check(bool ok) {
  if (!ok) std::abort();
}

int shared_memfd() {
  static const int fd = [] {
    const int f = ::memfd_create("memory_table_fuzz", MFD_CLOEXEC);
    check(f >= 0 && ::ftruncate(f, kFileSize) == 0);
    return f;
  }();
  return fd;
}

// Local regions live in this buffer.
alignas(4096) std::uint8_t g_local[kFileSize];

class Input {
 public:
  Input(const std::uint8_t* data, std::size_t size) : p_(data), end_(data + size) {}
  bool empty() const { return p_ == end_; }
  std::uint8_t u8() { return p_ < end_ ? *p_++ : 0; }
  std::uint64_t u64() {
    std::uint64_t v = 0;
    for (int i = 0; i < 8; ++i) v = v << 8 | u8();
    return v;
  }
  // Numbers of interesting shapes: pages of a small space (so regions meet and overlap), raw
  // 64-bit values, and values near the top of the address space.
  std::uint64_t addr() {
    switch (u8() % 5) {
      case 0: return static_cast<std::uint64_t>(u8() % 32) * 0x1000;
      case 1: return static_cast<std::uint64_t>(u8() % 32) * 0x1000 + u8() * 16ull;
      case 2: return kU64Max - (static_cast<std::uint64_t>(u8()) << (u8() % 16));
      case 3: return u64();
      default: return static_cast<std::uint64_t>(u8()) << 8 | u8();
    }
  }
  std::uint64_t length() {
    switch (u8() % 4) {
      case 0: return static_cast<std::uint64_t>(u8() % 17) * 0x1000;
      case 1: return u8();
      case 2: return u64();
      default: return static_cast<std::uint64_t>(u8()) << 8 | u8();
    }
  }

 private:
  const std::uint8_t* p_;
  const std::uint8_t* end_;
};

// The region of the model (a linear scan) that contains addr, in gpa or uva space.
const Region* model_find(const GuestMemory& mem, std::uint64_t addr, bool by_uva) {
  for (const Region& r : mem.regions()) {
    const std::uint64_t start = by_uva ? r.spec.userspace_addr : r.spec.guest_phys_addr;
    if (addr >= start && addr - start < r.spec.size) return &r;
  }
  return nullptr;
}

// [p, p + len) lies inside the host range of some live region (local regions may alias one
// another in g_local, so "some", not "exactly one"); touch its ends.
void check_inside(const GuestMemory& mem, const std::uint8_t* p, std::uint64_t len) {
  bool found = false;
  for (const Region& r : mem.regions()) {
    if (p >= r.host && p < r.host + r.spec.size &&
        len <= static_cast<std::uint64_t>(r.host + r.spec.size - p)) {
      found = true;
      if (r.map_base != nullptr) {
        const auto* base = static_cast<const std::uint8_t*>(r.map_base);
        check(r.host >= base && r.host + r.spec.size <= base + r.map_len);
      }
    }
  }
  check(found);
  if (len != 0) {
    volatile std::uint8_t sink = p[0];
    sink = p[len - 1];
    (void)sink;
  }
}

void check_table(const GuestMemory& mem) {
  const auto regs = mem.regions();
  check(regs.size() <= GuestMemory::kMaxRegions);
  for (std::size_t i = 0; i < regs.size(); ++i) {
    const RegionSpec& s = regs[i].spec;
    check(s.size != 0 && s.size <= kU64Max - s.guest_phys_addr &&
          s.size <= kU64Max - s.userspace_addr);
    if (i + 1 < regs.size()) {
      check(s.guest_phys_addr + s.size <= regs[i + 1].spec.guest_phys_addr);
    }
    for (std::size_t j = i + 1; j < regs.size(); ++j) {
      const RegionSpec& o = regs[j].spec;
      check(s.userspace_addr + s.size <= o.userspace_addr ||
            o.userspace_addr + o.size <= s.userspace_addr);
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Input in(data, size);
  std::vector<int> given_fds;
  {
    GuestMemory mem;
    std::array<std::uint8_t, 64> log_buf{};  // the log is the first log_bytes of it
    std::size_t log_bytes = 0;
    DirtyLog log;
    std::array<iovec, 8> iov{};
    for (int ops = 0; ops < 512 && !in.empty(); ++ops) {
      switch (in.u8() % 10) {
        case 0:
        case 1: {  // add a memfd region
          RegionSpec s{in.addr(), in.length(), in.addr(), in.length()};
          UniqueFd fd(::dup(shared_memfd()));
          check(fd.valid());
          given_fds.push_back(fd.get());
          const std::size_t before = mem.region_count();
          auto r = mem.add_region(s, std::move(fd));
          check(mem.region_count() == before + (r ? 1 : 0));
          if (r) check(s.mmap_offset + s.size <= kFileSize);
          check_table(mem);
          break;
        }
        case 2: {  // add a local region within g_local
          const std::uint64_t off = in.u8() % 16 * 0x1000;
          const std::uint64_t len = in.length() % (kFileSize - off + 1);
          RegionSpec s{in.addr(), len, in.addr(), 0};
          auto r = mem.add_local_region(s, g_local + off);
          if (r) check(len != 0);
          check_table(mem);
          break;
        }
        case 3: {  // remove: an existing region by index, or a fuzzed spec
          const auto regs = mem.regions();
          const std::size_t before = regs.size();
          if (!regs.empty() && in.u8() % 4 != 0) {
            const RegionSpec s = regs[in.u8() % regs.size()].spec;
            check(mem.remove_region(s).has_value());
            check(mem.region_count() == before - 1);
          } else {
            RegionSpec s{in.addr(), in.length(), in.addr(), 0};
            auto r = mem.remove_region(s);
            check(mem.region_count() == before - (r ? 1 : 0));
          }
          break;
        }
        case 4: {  // gpa_to_host against the model
          const std::uint64_t gpa = in.addr(), len = in.length();
          std::uint8_t* p = mem.gpa_to_host(gpa, len);
          const Region* m = model_find(mem, gpa, false);
          const bool fits = m != nullptr && len <= m->spec.size - (gpa - m->spec.guest_phys_addr);
          check((p != nullptr) == fits);
          if (p != nullptr) {
            check(p == m->host + (gpa - m->spec.guest_phys_addr));
            check_inside(mem, p, len);
          }
          break;
        }
        case 5: {  // uva_to_host and uva_to_gpa against the model
          const std::uint64_t uva = in.addr(), len = in.length();
          std::uint8_t* p = mem.uva_to_host(uva, len);
          const Region* m = model_find(mem, uva, true);
          const bool fits = m != nullptr && len <= m->spec.size - (uva - m->spec.userspace_addr);
          check((p != nullptr) == fits);
          if (p != nullptr) {
            check(p == m->host + (uva - m->spec.userspace_addr));
            check_inside(mem, p, len);
          }
          auto g = mem.uva_to_gpa(uva);
          check(g.has_value() == (m != nullptr));
          if (g) check(mem.gpa_to_host(*g, 0) == m->host + (uva - m->spec.userspace_addr));
          break;
        }
        case 6:
        case 7: {  // gpa_to_iovec
          const std::uint64_t gpa = in.addr(), len = in.length();
          const std::size_t cap = in.u8() % (iov.size() + 1);
          auto n = mem.gpa_to_iovec(gpa, len, std::span(iov).first(cap));
          if (len > kU64Max - gpa) {
            check(!n && n.error() == XlateError::wraps);
            break;
          }
          if (!n) {
            // not_mapped must be true of the model: walk it.
            std::uint64_t cur = gpa, rem = len;
            std::size_t pieces = 0;
            bool mapped = true;
            do {
              const Region* m = model_find(mem, cur, false);
              if (m == nullptr) {
                mapped = false;
                break;
              }
              const std::uint64_t piece =
                  std::min(rem, m->spec.size - (cur - m->spec.guest_phys_addr));
              ++pieces;
              cur += piece;
              rem -= piece;
            } while (rem != 0);
            if (n.error() == XlateError::not_mapped) check(!mapped);
            if (n.error() == XlateError::too_many_iov) check(mapped && pieces > cap);
            break;
          }
          check(*n <= cap);
          check(len == 0 ? *n == 0 : *n >= 1);
          std::uint64_t sum = 0;
          for (std::size_t i = 0; i < *n; ++i) {
            check(iov[i].iov_len != 0);
            check_inside(mem, static_cast<std::uint8_t*>(iov[i].iov_base), iov[i].iov_len);
            sum += iov[i].iov_len;
          }
          check(sum == len);
          if (*n >= 1) check(iov[0].iov_base == mem.gpa_to_host(gpa, 0));
          break;
        }
        case 8: {  // (re)attach a local log of fuzzed size
          log_bytes = 1 + in.u8() % 32;
          log_buf.fill(0);
          check(log.attach_local(std::span(log_buf).first(log_bytes)).has_value());
          mem.set_dirty_log(in.u8() % 2 ? &log : nullptr);
          break;
        }
        case 9: {  // log a write
          const std::uint64_t gpa = in.addr(), len = in.length();
          const std::uint64_t dropped = log.dropped();
          mem.log_write(gpa, len);
          // Never a byte past the log.
          for (std::size_t i = log_bytes; i < log_buf.size(); ++i) check(log_buf[i] == 0);
          if (mem.dirty_log() != nullptr && len != 0) {
            const std::uint64_t page = gpa / DirtyLog::kPageSize;
            if (page < log_bytes * 8)
              check(log.is_dirty(gpa));
            else
              check(log.dropped() == dropped + 1);
          }
          break;
        }
      }
    }
  }
  // Every fd handed to the table is closed once it is gone, added or refused.
  for (int fd : given_fds) check(::fcntl(fd, F_GETFD) == -1);
  return 0;
}
