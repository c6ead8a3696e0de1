// Fuzzes parse_blk_request alone: random iovec shapes (each piece its own heap block of exactly
// its length, so ASan reports any byte read outside the pieces), random limits and a header
// steered towards every type and the sector edges. Checks: no byte of the pieces changes (parse
// writes nothing there) and nothing past the data array is written (ASan); a request's data lies
// inside the capacity and within max_transfer, is exactly the bytes between header and status
// byte in the chain's order, and the status byte is the chain's last writable byte; a read-only
// device never gets a write, discard or write-zeroes; a refusal answers IOERR or UNSUPP at that
// same status byte (or has none, when there is no writable byte); parsing twice gives the same
// answer.
//
// Input:
//   byte 0   bit 0: read-only; bit 1: DISCARD negotiated; bit 2: WRITE_ZEROES negotiated;
//            bit 3: steer the header (below); bit 4: steer a discard segment after it
//   byte 1   capacity: one of kCapacities (b % count)
//   byte 2   bits 0-1: max_transfer (kMaxTransfers), bits 2-3: max_discard_sectors
//            (kMaxDiscards), bits 4-7: data array size 1 + b
//   byte 3   bits 0-3: readable pieces, bits 4-7: writable pieces (each % 9)
//   then per piece, 2 bytes: le16 length, below 0xfff0 as (v & 0x1fff); else one of kOddLens
//   steered header: u8 type (kTypes; the last entry: a raw le32 follows), then a sector
//   steered segment: a sector, le32 num_sectors, le32 flags
//   (a sector: u8 kind, relative to the capacity (pick_sector); kind 7 mod 8: a raw le64 follows)
//   rest     the pieces' bytes, readable then writable (zeros past the input's end); the steered
//            header and segment are then written over the first readable bytes
#include <sys/uio.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "fuzz_util.h"
#include "vhostkit/blk/blk_device.h"
#include "vhostkit/blk/blk_request.h"
#include "vhostkit/virtio/blk.h"
#include "vhostkit/virtq/iov.h"

namespace {

using namespace vhostkit;
using blk::BlkOp;
using blk::BlkRefusalReason;
using fuzz::Reader;

constexpr std::uint64_t kCapacities[] = {
    1, 2, 8, 128, 8192, std::uint64_t{1} << 32, (std::uint64_t{1} << 55) - 1, 0,
};
constexpr std::uint32_t kMaxTransfers[] = {512, 4096, 65536, blk::BlkDevice::kMaxTransfer};
constexpr std::uint32_t kMaxDiscards[] = {1, 8, 256, blk::BlkDevice::kMaxDiscardSectors};
constexpr std::size_t kOddLens[] = {0, 1, 15, 16, 17, 31, 32, 33, 511, 512, 513, 4096, 4097, 65536};
constexpr std::uint32_t kTypes[] = {
    virtio::blk_type::in,           virtio::blk_type::out,
    virtio::blk_type::flush,        virtio::blk_type::get_id,
    virtio::blk_type::discard,      virtio::blk_type::write_zeroes,
    virtio::blk_type::get_lifetime, 0xffffffffu,  // the last: a raw le32 follows
};

[[noreturn]] void finding(const char* what) {
  std::fprintf(stderr, "blk_parse_fuzz: %s\n", what);
  std::abort();
}

void check(bool ok, const char* what) {
  if (!ok) finding(what);
}

// A sector near the interesting edges of `capacity`, or a raw one.
std::uint64_t pick_sector(Reader& in, std::uint64_t capacity) {
  const std::uint8_t kind = in.u8();
  switch (kind % 8) {
    case 0: return 0;
    case 1: return capacity - 1;
    case 2: return capacity;
    case 3: return capacity + 1;
    case 4: return ~std::uint64_t{0};
    case 5: return std::uint64_t{1} << 55;  // * 512 == 2^64
    case 6: return capacity - (kind >> 3);
    default: {
      std::uint64_t v = 0;
      in.bytes(&v, sizeof v);
      return v;
    }
  }
}

// One piece of the chain: a heap block of exactly its length (ASan sees any access past it).
struct Piece {
  std::unique_ptr<std::uint8_t[]> bytes;
  std::size_t len = 0;
};

// Walks bytes [skip, skip + len) of `src` and checks that `data` is exactly them, as non-empty
// pieces in order.
bool is_slice(std::span<const iovec> data, std::span<const iovec> src, std::size_t skip,
              std::uint64_t len) {
  std::size_t i = 0, off = 0;
  auto settle = [&] {
    while (i < src.size() && off == src[i].iov_len) {
      ++i;
      off = 0;
    }
  };
  // Move to byte `skip`.
  while (i < src.size() && skip >= src[i].iov_len - off) {
    skip -= src[i].iov_len - off;
    ++i;
    off = 0;
  }
  off += skip;
  std::uint64_t total = 0;
  for (const iovec& d : data) {
    settle();
    if (d.iov_len == 0 || i == src.size()) return false;
    if (d.iov_base != static_cast<std::uint8_t*>(src[i].iov_base) + off) return false;
    if (d.iov_len > src[i].iov_len - off) return false;
    off += d.iov_len;
    total += d.iov_len;
  }
  return total == len;
}

std::uint8_t* last_writable_byte(std::span<const iovec> w) {
  for (auto it = w.rbegin(); it != w.rend(); ++it) {
    if (it->iov_len != 0) return static_cast<std::uint8_t*>(it->iov_base) + it->iov_len - 1;
  }
  return nullptr;
}

bool same(const std::expected<blk::BlkRequest, blk::BlkRefusal>& a,
          const std::expected<blk::BlkRequest, blk::BlkRefusal>& b) {
  if (a.has_value() != b.has_value()) return false;
  if (!a) {
    return a.error().reason == b.error().reason && a.error().answer == b.error().answer &&
           a.error().status == b.error().status;
  }
  if (a->op != b->op || a->sector != b->sector || a->length != b->length || a->unmap != b->unmap ||
      a->status != b->status || a->data.size() != b->data.size()) {
    return false;
  }
  for (std::size_t i = 0; i < a->data.size(); ++i) {
    if (a->data[i].iov_base != b->data[i].iov_base || a->data[i].iov_len != b->data[i].iov_len) {
      return false;
    }
  }
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Reader in{data, size};
  const std::uint8_t flags = in.u8();
  blk::BlkLimits limits;
  limits.read_only = (flags & 1) != 0;
  limits.discard = (flags & 2) != 0;
  limits.write_zeroes = (flags & 4) != 0;
  limits.capacity = kCapacities[in.u8() % std::size(kCapacities)];
  const std::uint8_t sizes = in.u8();
  limits.max_transfer = kMaxTransfers[sizes & 3];
  limits.max_discard_sectors = kMaxDiscards[(sizes >> 2) & 3];
  const std::size_t out_size = 1 + (sizes >> 4);
  const std::uint8_t counts = in.u8();
  const std::size_t nr = (counts & 15) % 9;
  const std::size_t nw = (counts >> 4) % 9;

  std::vector<Piece> pieces(nr + nw);
  std::vector<iovec> iov(nr + nw);
  for (std::size_t i = 0; i < pieces.size(); ++i) {
    const std::uint16_t v = in.u16();
    pieces[i].len = v < 0xfff0 ? (v & 0x1fff) : kOddLens[(v - 0xfff0) % std::size(kOddLens)];
    pieces[i].bytes = std::make_unique<std::uint8_t[]>(pieces[i].len);
    iov[i] = iovec{pieces[i].bytes.get(), pieces[i].len};
  }
  const std::span<const iovec> readable(iov.data(), nr);
  const std::span<const iovec> writable(iov.data() + nr, nw);

  virtio::VirtioBlkOutHdr hdr{};
  virtio::VirtioBlkDiscardWriteZeroes seg{};
  if (flags & 8) {
    const std::uint8_t t = in.u8() % std::size(kTypes);
    hdr.type = kTypes[t];
    if (t == std::size(kTypes) - 1) {
      in.bytes(&hdr.type, sizeof hdr.type);
    }
    hdr.sector = pick_sector(in, limits.capacity);
  }
  if (flags & 16) {
    seg.sector = pick_sector(in, limits.capacity);
    in.bytes(&seg.num_sectors, sizeof seg.num_sectors);
    in.bytes(&seg.flags, sizeof seg.flags);
  }
  for (Piece& p : pieces) in.bytes(p.bytes.get(), p.len);
  if (flags & 8) virtq::iov_write(readable, 0, &hdr, sizeof hdr);
  if (flags & 16) virtq::iov_write(readable, sizeof hdr, &seg, sizeof seg);

  blk::BlkChain chain{readable, writable, virtq::iov_size(readable), virtq::iov_size(writable)};
  std::vector<std::vector<std::uint8_t>> before;
  before.reserve(pieces.size());
  for (const Piece& p : pieces) before.emplace_back(p.bytes.get(), p.bytes.get() + p.len);

  // Exactly out_size entries on the heap: a write past them is an ASan report.
  auto out1 = std::make_unique<iovec[]>(out_size);
  auto out2 = std::make_unique<iovec[]>(out_size);
  const auto r = blk::parse_blk_request(chain, limits, std::span<iovec>(out1.get(), out_size));
  const auto r2 = blk::parse_blk_request(chain, limits, std::span<iovec>(out2.get(), out_size));

  for (std::size_t i = 0; i < pieces.size(); ++i) {
    check(pieces[i].len == 0 ||
              std::memcmp(before[i].data(), pieces[i].bytes.get(), pieces[i].len) == 0,
          "parse wrote into the chain");
  }
  check(same(r, r2), "parse is not deterministic");

  std::uint8_t* const status = chain.writable_len == 0 ? nullptr : last_writable_byte(writable);
  if (!r) {
    const blk::BlkRefusal& f = r.error();
    if (f.reason == BlkRefusalReason::no_status_byte) {
      check(status == nullptr && f.status == nullptr, "no status byte claimed, one exists");
      return 0;
    }
    check(f.status == status && status != nullptr, "a refusal answers at the wrong byte");
    check(f.answer == virtio::kBlkSIoErr || f.answer == virtio::kBlkSUnsupp,
          "a refusal answers neither IOERR nor UNSUPP");
    return 0;
  }
  check(r->status == status && status != nullptr, "the status byte is not the last writable");
  check(r->data.empty() || r->data.data() == out1.get(), "data outside the caller's array");
  check(r->data.size() <= out_size, "more data pieces than the array holds");
  const unsigned __int128 end =
      static_cast<unsigned __int128>(r->sector) * 512 + static_cast<unsigned __int128>(r->length);
  const unsigned __int128 capacity_bytes = static_cast<unsigned __int128>(limits.capacity) * 512;
  switch (r->op) {
    case BlkOp::read:
    case BlkOp::write: {
      const bool read = r->op == BlkOp::read;
      check(read || !limits.read_only, "a write on a read-only device");
      check(r->length % 512 == 0, "a transfer not a whole number of sectors");
      check(r->length <= limits.max_transfer, "a transfer beyond max_transfer");
      check(r->sector <= limits.capacity && end <= capacity_bytes, "a transfer past the capacity");
      // Reads: the writable bytes before the status byte; writes: the readable bytes after the
      // header. Nothing else may move.
      check(read ? chain.readable_len == sizeof hdr && r->length == chain.writable_len - 1
                 : chain.writable_len == 1 && r->length == chain.readable_len - sizeof hdr,
            "data in a direction the request does not move");
      check(read ? is_slice(r->data, writable, 0, r->length)
                 : is_slice(r->data, readable, sizeof hdr, r->length),
            "data pieces are not the chain's data bytes");
      break;
    }
    case BlkOp::get_id:
      check(r->length <= virtio::kBlkIdBytes && r->length <= chain.writable_len - 1,
            "get_id room beyond 20 bytes or the chain");
      check(is_slice(r->data, writable, 0, r->length), "get_id pieces are not the chain's bytes");
      break;
    case BlkOp::flush: check(r->data.empty() && r->length == 0, "a flush with data"); break;
    case BlkOp::discard:
    case BlkOp::write_zeroes:
      check(!limits.read_only, "a discard or write-zeroes on a read-only device");
      check(r->op == BlkOp::discard ? limits.discard : limits.write_zeroes,
            "a discard or write-zeroes not negotiated");
      check(r->op == BlkOp::write_zeroes || !r->unmap, "a discard with unmap");
      check(r->data.empty(), "a discard with data pieces");
      check(r->length != 0 && r->length % 512 == 0 &&
                r->length <= std::uint64_t{limits.max_discard_sectors} * 512,
            "a discard range of a bad size");
      check(r->sector <= limits.capacity && end <= capacity_bytes, "a discard past the capacity");
      break;
  }
  return 0;
}
