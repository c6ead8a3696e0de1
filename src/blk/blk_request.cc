// parse_blk_request: a validated chain and the device's limits in, a request or a refusal out.
#include "vhostkit/blk/blk_request.h"

#include <algorithm>
#include <optional>

#include "vhostkit/virtio/blk.h"
#include "vhostkit/virtq/iov.h"

namespace vhostkit::blk {

namespace {

using virtio::kBlkSectorSize;

// Bytes [skip, skip + len) of `v` as non-empty pieces in `out`: how many, or nothing if `out`
// holds too few. The caller knows `v` holds that many bytes.
std::optional<std::size_t> slice(std::span<const iovec> v, std::uint64_t skip, std::uint64_t len,
                                 std::span<iovec> out) {
  const std::size_t n = virtq::iov_tail(v, skip, out);
  for (std::size_t k = 0; k < n && len != 0; ++k) {
    if (out[k].iov_len >= len) {
      out[k].iov_len = len;
      return k + 1;
    }
    len -= out[k].iov_len;
  }
  if (len != 0) return std::nullopt;  // out filled up first
  return 0;
}

// The sector range [sector, sector + bytes/512) lies within the capacity (no wrap-around).
bool in_range(std::uint64_t sector, std::uint64_t bytes, std::uint64_t capacity) {
  return sector <= capacity && bytes / kBlkSectorSize <= capacity - sector;
}

// The last writable byte, or nullptr if every writable piece is empty.
std::uint8_t* last_writable_byte(std::span<const iovec> w) {
  for (auto it = w.rbegin(); it != w.rend(); ++it) {
    if (it->iov_len != 0) return static_cast<std::uint8_t*>(it->iov_base) + it->iov_len - 1;
  }
  return nullptr;
}

}  // namespace

const char* to_string(BlkOp op) noexcept {
  switch (op) {
    case BlkOp::read: return "read";
    case BlkOp::write: return "write";
    case BlkOp::flush: return "flush";
    case BlkOp::get_id: return "get_id";
    case BlkOp::discard: return "discard";
    case BlkOp::write_zeroes: return "write_zeroes";
  }
  return "?";
}

const char* to_string(BlkRefusalReason r) noexcept {
  switch (r) {
    case BlkRefusalReason::no_status_byte: return "no status byte";
    case BlkRefusalReason::short_header: return "header shorter than 16 bytes";
    case BlkRefusalReason::unknown_type: return "unknown request type";
    case BlkRefusalReason::misplaced_data: return "data the request type can't have";
    case BlkRefusalReason::partial_sector: return "data not a whole number of sectors";
    case BlkRefusalReason::too_large: return "data beyond size_max";
    case BlkRefusalReason::out_of_range: return "sector range past the capacity";
    case BlkRefusalReason::read_only: return "read-only device";
    case BlkRefusalReason::not_negotiated: return "feature not negotiated";
    case BlkRefusalReason::bad_segment: return "not one 16-byte segment";
    case BlkRefusalReason::unsupported_flags: return "unsupported segment flags";
    case BlkRefusalReason::bad_sector_count: return "segment sector count 0 or too large";
    case BlkRefusalReason::too_many_pieces: return "more data pieces than the request holds";
  }
  return "?";
}

std::expected<BlkRequest, BlkRefusal> parse_blk_request(const BlkChain& chain,
                                                        const BlkLimits& limits,
                                                        std::span<iovec> data_out) noexcept {
  BlkRequest req;
  req.status = chain.writable_len == 0 ? nullptr : last_writable_byte(chain.writable);
  if (req.status == nullptr) {
    // Nowhere to say what went wrong (no status byte, or it sits in a readable buffer).
    return std::unexpected(BlkRefusal{BlkRefusalReason::no_status_byte, 0, nullptr});
  }
  auto refuse = [&](BlkRefusalReason why, std::uint8_t answer = virtio::kBlkSIoErr) {
    return std::unexpected(BlkRefusal{why, answer, req.status});
  };
  // Data in a direction is the bytes of the chain that are neither header nor status; only a
  // type that moves data that way may have any.
  virtio::VirtioBlkOutHdr hdr{};
  if (virtq::iov_read(chain.readable, 0, &hdr, sizeof hdr) != sizeof hdr) {
    return refuse(BlkRefusalReason::short_header);
  }
  const std::uint64_t out_data = chain.readable_len - sizeof hdr;
  const std::uint64_t in_data = chain.writable_len - 1;

  auto take_data = [&](std::span<const iovec> v, std::uint64_t skip, std::uint64_t len) -> bool {
    const auto n = slice(v, skip, len, data_out);
    if (!n) return false;
    req.data = data_out.first(*n);
    req.length = len;
    return true;
  };

  switch (hdr.type) {
    case virtio::blk_type::in:
    case virtio::blk_type::out: {
      const bool read = hdr.type == virtio::blk_type::in;
      const std::uint64_t len = read ? in_data : out_data;
      if ((read ? out_data : in_data) != 0) return refuse(BlkRefusalReason::misplaced_data);
      if (len % kBlkSectorSize != 0) return refuse(BlkRefusalReason::partial_sector);
      if (len > limits.max_transfer) return refuse(BlkRefusalReason::too_large);
      if (!in_range(hdr.sector, len, limits.capacity)) {
        return refuse(BlkRefusalReason::out_of_range);
      }
      if (!read && limits.read_only) return refuse(BlkRefusalReason::read_only);
      req.op = read ? BlkOp::read : BlkOp::write;
      req.sector = hdr.sector;
      if (!(read ? take_data(chain.writable, 0, len)
                 : take_data(chain.readable, sizeof hdr, len))) {
        return refuse(BlkRefusalReason::too_many_pieces);
      }
      return req;
    }
    case virtio::blk_type::flush: req.op = BlkOp::flush; return req;
    case virtio::blk_type::get_id:
      // Up to 20 bytes of serial; a shorter buffer gets what fits.
      req.op = BlkOp::get_id;
      if (!take_data(chain.writable, 0, std::min<std::uint64_t>(in_data, virtio::kBlkIdBytes))) {
        return refuse(BlkRefusalReason::too_many_pieces);
      }
      return req;
    case virtio::blk_type::discard:
    case virtio::blk_type::write_zeroes: {
      const bool zeroes = hdr.type == virtio::blk_type::write_zeroes;
      if (!(zeroes ? limits.write_zeroes : limits.discard)) {
        return refuse(BlkRefusalReason::not_negotiated, virtio::kBlkSUnsupp);
      }
      // One segment (max_discard_seg = max_write_zeroes_seg = 1).
      virtio::VirtioBlkDiscardWriteZeroes seg{};
      if (in_data != 0 || out_data != sizeof seg ||
          virtq::iov_read(chain.readable, sizeof hdr, &seg, sizeof seg) != sizeof seg) {
        return refuse(BlkRefusalReason::bad_segment);
      }
      // Discard with the unmap flag, or any flag but unmap, is not ours to honour (5.2.6.2).
      if (zeroes ? (seg.flags & ~virtio::kBlkWriteZeroesFUnmap) != 0 : seg.flags != 0) {
        return refuse(BlkRefusalReason::unsupported_flags, virtio::kBlkSUnsupp);
      }
      if (seg.num_sectors == 0 || seg.num_sectors > limits.max_discard_sectors) {
        return refuse(BlkRefusalReason::bad_sector_count);
      }
      const std::uint64_t bytes = std::uint64_t{seg.num_sectors} * kBlkSectorSize;
      if (!in_range(seg.sector, bytes, limits.capacity)) {
        return refuse(BlkRefusalReason::out_of_range);
      }
      if (limits.read_only) return refuse(BlkRefusalReason::read_only);
      req.op = zeroes ? BlkOp::write_zeroes : BlkOp::discard;
      req.sector = seg.sector;
      req.length = bytes;
      req.unmap = (seg.flags & virtio::kBlkWriteZeroesFUnmap) != 0;
      return req;
    }
    default: return refuse(BlkRefusalReason::unknown_type, virtio::kBlkSUnsupp);
  }
}

}  // namespace vhostkit::blk
