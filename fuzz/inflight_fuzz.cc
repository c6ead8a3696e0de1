// Fuzzes the inflight I/O region as a hostile front-end hands it over (SET_INFLIGHT_FD): the
// region's bytes and the numbers of the message come from the input. attach() and recover() must
// answer without reading or writing outside the mapping (ASan watches the data path's stores,
// and every result is checked: heads in the ring, distinct, in counter order). When queue 0 is
// accepted, the input then drives it as a device would (submit, answer in batches) and "crashes"
// it at one of the three points the spec covers; a second back-end attaching the same fd must
// then find exactly the heads the model holds in flight, in the order they were submitted.
//
// Input:
//   byte 0   num_queues 1 + b % 4
//   byte 1   queue size 1 << (b % 8); ring size: the queue size >> (bit 7 of byte 2)
//   byte 2   bits 0-1: mmap_offset 0, 64, 4096 + 64 or 4096 * 3; bit 2: mmap_size off by
//            8 * (int8)byte 3; bit 3: file shorter by byte 3; bit 4: a memfd that can't be sealed
//   byte 3   see byte 2
//   bytes 4-5  the ring's used idx at attach (le16)
//   bytes 6..37  32 operations for queue 0 (see drive())
//   rest     the region's bytes from mmap_offset, zero-filled past the input
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "testing/fd_count.h"
#include "vhostkit/vhost/inflight.h"

namespace {

using vhostkit::UniqueFd;
using vhostkit::vhost::InflightLayout;
using vhostkit::vhost::InflightRecovery;
using vhostkit::vhost::InflightRegion;
using vhostkit::vhost::InflightSplitQueue;

constexpr std::size_t kHeader = 6, kOps = 32;

void check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "inflight_fuzz: %s\n", what);
    std::abort();
  }
}

std::uint8_t at(const std::uint8_t* data, std::size_t size, std::size_t i) {
  return i < size ? data[i] : 0;
}

// What recover() returned is usable: heads inside the ring, each once, and counters rising.
void check_recovery(const InflightRecovery& rec, const InflightSplitQueue& q, std::uint32_t ring,
                    const std::uint8_t* queue_bytes) {
  std::vector<bool> seen(ring);
  std::uint64_t last = 0;
  for (std::size_t i = 0; i < rec.resubmit.size(); ++i) {
    const std::uint16_t h = rec.resubmit[i];
    check(h < ring, "a resubmitted head outside the ring");
    check(!seen[h], "a head resubmitted twice");
    seen[h] = true;
    vhostkit::vhost::InflightSplitDesc d;
    std::memcpy(&d, queue_bytes + sizeof(vhostkit::vhost::InflightSplitHeader) + h * sizeof d,
                sizeof d);
    check(d.inflight == 1, "a resubmitted head not marked");
    check(i == 0 || d.counter > last, "resubmit order is not counter order");
    last = d.counter;
  }
  check(rec.resubmit.empty() || q.next_counter() == last + 1, "next counter not after the last");
  check(rec.last_avail_idx == static_cast<std::uint16_t>(rec.used_idx + rec.resubmit.size()),
        "last_avail_idx is not used idx + resubmitted");
}

// Drives an accepted queue 0 with the operations, then crashes it and checks what the next
// back-end finds against the model.
void drive(const InflightRegion& region, InflightSplitQueue& q, std::uint32_t ring,
           std::vector<std::uint16_t> model, std::uint16_t used, const std::uint8_t* ops) {
  std::vector<bool> out(ring);
  for (std::uint16_t h : model) out[h] = true;
  for (std::size_t i = 0; i + 1 < kOps; ++i) {
    const std::uint8_t op = ops[i], arg = ops[i + 1];
    if (op % 2 == 0) {  // submit a head that is not out already
      const auto h = static_cast<std::uint16_t>(arg % ring);
      if (out[h]) continue;
      q.submit(h);
      out[h] = true;
      model.push_back(h);
    } else if (!model.empty()) {  // answer 1..4 of the heads out, in any order, as one batch
      const std::size_t n = std::min<std::size_t>(1 + op / 2 % 4, model.size());
      for (std::size_t k = 0; k < n; ++k) {
        const std::size_t pick = (arg + k * 7) % model.size();
        q.used(model[pick]);
        out[model[pick]] = false;
        model.erase(model.begin() + static_cast<std::ptrdiff_t>(pick));
      }
      used = static_cast<std::uint16_t>(used + n);
      q.published(used);
    }
  }
  check(q.misuse() == 0, "the model broke a data-path rule");

  // The crash: 0 clean; 1 a batch linked, the used idx published, the marks not cleared; 2 a
  // batch linked but the used idx not yet published.
  const std::uint8_t mode = ops[kOps - 1] % 3;
  std::vector<std::uint16_t> expect = model;
  std::uint16_t ring_used = used;
  if (mode != 0 && !model.empty()) {
    const std::size_t n = 1 + ops[0] % model.size();
    for (std::size_t k = 0; k < n; ++k) q.used(model[model.size() - 1 - k]);
    if (mode == 1) {
      ring_used = static_cast<std::uint16_t>(used + n);
      expect.resize(model.size() - n);
    }
  }
  auto next =
      InflightRegion::attach(UniqueFd(::dup(region.fd())), region.mmap_size(), region.mmap_offset(),
                             region.layout(), region.num_queues(), region.queue_size());
  check(next.has_value(), "our own region refused on restart");
  auto rec = next->split_queue(0)->recover(ring_used, ring);
  check(rec.has_value(), "our own queue refused on restart");
  check(rec->resubmit == expect, "the next back-end finds other heads in flight than the model");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::size_t fds_before = vhostkit::testing::vhostkit_fd_count();
  const std::uint32_t queues = 1 + at(data, size, 0) % 4;
  const std::uint32_t qsize = 1u << (at(data, size, 1) % 8);
  const std::uint8_t flags = at(data, size, 2);
  const auto tweak = static_cast<std::int8_t>(at(data, size, 3));
  const std::uint32_t ring = std::max<std::uint32_t>(1, qsize >> (flags >> 7));
  const auto used = static_cast<std::uint16_t>(at(data, size, 4) | at(data, size, 5) << 8);
  std::uint8_t ops[kOps];
  for (std::size_t i = 0; i < kOps; ++i) ops[i] = at(data, size, kHeader + i);
  const std::size_t body = kHeader + kOps;

  static constexpr std::uint64_t kOffsets[] = {0, 64, 4096 + 64, 4096 * 3};
  const std::uint64_t offset = kOffsets[flags & 3];
  const std::uint64_t want = vhostkit::vhost::inflight_size(InflightLayout::split, queues, qsize)
                                 .value();  // the shape is always valid here
  std::uint64_t mmap_size = want;
  if (flags & 4) mmap_size += static_cast<std::uint64_t>(static_cast<std::int64_t>(tweak) * 8);
  std::uint64_t file = offset + want;
  if (flags & 8) file -= std::min<std::uint64_t>(file, static_cast<std::uint8_t>(tweak));

  const unsigned mfd_flags = (flags & 16) ? MFD_CLOEXEC : MFD_CLOEXEC | MFD_ALLOW_SEALING;
  UniqueFd fd(::memfd_create("inflight_fuzz", mfd_flags));
  check(fd.valid() && ::ftruncate(fd.get(), static_cast<off_t>(file)) == 0, "memfd");
  if (size > body) {
    const std::size_t n = std::min<std::uint64_t>(size - body, file - std::min(file, offset));
    check(::pwrite(fd.get(), data + body, n, static_cast<off_t>(offset)) == static_cast<ssize_t>(n),
          "pwrite");
  }

  {
    auto region = InflightRegion::attach(std::move(fd), mmap_size, offset, InflightLayout::split,
                                         queues, qsize);
    if (region) {
      check(region->num_queues() == queues && region->queue_size() == qsize, "shape");
      const std::uint64_t stride =
          vhostkit::vhost::inflight_queue_bytes(InflightLayout::split, qsize);
      // A view of the region through our own mapping, to check the results against the bytes.
      void* view = ::mmap(nullptr, offset + want, PROT_READ, MAP_SHARED, region->fd(), 0);
      check(view != MAP_FAILED, "view mmap");
      const auto* bytes = static_cast<const std::uint8_t*>(view) + offset;
      std::vector<InflightRecovery> recs;
      bool first_ok = false;
      for (std::uint32_t q = 0; q < queues; ++q) {
        InflightSplitQueue& sq = *region->split_queue(q);
        auto rec = sq.recover(static_cast<std::uint16_t>(used + q), ring);
        if (!rec) continue;
        check_recovery(*rec, sq, ring, bytes + q * stride);
        if (q == 0) {
          first_ok = true;
          recs.push_back(std::move(*rec));
        }
      }
      if (first_ok) {
        drive(*region, *region->split_queue(0), ring, recs[0].resubmit, recs[0].used_idx, ops);
      }
      ::munmap(view, offset + want);
    }
  }
  check(vhostkit::testing::vhostkit_fd_count() == fds_before, "an fd leaked");
  return 0;
}
