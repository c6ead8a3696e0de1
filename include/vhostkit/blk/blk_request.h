// Parsing a virtio-blk request (virtio 1.2, 5.2.6) out of a validated chain, apart from acting on
// it: parse_blk_request reads the header (and a discard segment) from guest memory, checks them
// against the device's limits and says either what to do or what to answer. It does no I/O,
// writes nothing but the caller's data array and counts nothing, so it can be tested and fuzzed
// alone; the device's queue (src/blk/blk_io.cc) submits what it returns and answers.
//
// A chain is: the 16-byte header in the first readable bytes (possibly split over pieces), then
// data (readable for OUT/DISCARD/WRITE_ZEROES, writable for IN/GET_ID), then one status byte, the
// last writable byte. Everything in it is hostile.
#pragma once

#include <sys/uio.h>

#include <cstdint>
#include <expected>
#include <span>

namespace vhostkit::blk {

// The chain as the walker (virtq) validated it: host pieces of the device-readable part, then
// of the device-writable part, each *_len the sum of its pieces' lengths.
struct BlkChain {
  std::span<const iovec> readable;
  std::span<const iovec> writable;
  std::uint64_t readable_len = 0;
  std::uint64_t writable_len = 0;
};

// What the device checks a request against.
struct BlkLimits {
  std::uint64_t capacity = 0;  // 512-byte sectors
  bool read_only = false;
  bool discard = false;       // VIRTIO_BLK_F_DISCARD negotiated
  bool write_zeroes = false;  // VIRTIO_BLK_F_WRITE_ZEROES negotiated
  // The most one read or write moves (config size_max; BlkDevice::kMaxTransfer).
  std::uint32_t max_transfer = 0;
  // The most sectors one DISCARD / WRITE_ZEROES segment covers (BlkDevice::kMaxDiscardSectors).
  std::uint32_t max_discard_sectors = 0;
};

enum class BlkOp : std::uint8_t { read, write, flush, get_id, discard, write_zeroes };
const char* to_string(BlkOp op) noexcept;

// A request the device may carry out.
struct BlkRequest {
  BlkOp op = BlkOp::flush;
  // read/write: the header's sector; discard/write_zeroes: the segment's; else 0.
  std::uint64_t sector = 0;
  // Bytes: read/write the data moved (a whole number of sectors, at most max_transfer, within
  // the capacity); discard/write_zeroes the range covered (within the capacity); get_id the
  // writable bytes before the status byte; flush 0.
  std::uint64_t length = 0;
  bool unmap = false;  // write_zeroes may punch a hole
  // read/write/get_id: the data, as non-empty pieces in the caller's array; else empty.
  std::span<iovec> data;
  std::uint8_t* status = nullptr;  // the status byte: the chain's last writable byte

  std::uint64_t offset() const noexcept { return sector * 512; }
};

enum class BlkRefusalReason : std::uint8_t {
  no_status_byte,     // no writable byte: nowhere to answer (used len 0, no status)
  short_header,       // fewer readable bytes than the header
  unknown_type,       // a type we do not serve (UNSUPP)
  misplaced_data,     // data the request type can't have (writable on OUT, readable on IN...)
  partial_sector,     // read/write data not a whole number of sectors
  too_large,          // read/write data beyond max_transfer
  out_of_range,       // the sector range runs past the capacity (or wraps)
  read_only,          // a write, discard or write-zeroes on a read-only device
  not_negotiated,     // DISCARD / WRITE_ZEROES without its feature (UNSUPP)
  bad_segment,        // DISCARD / WRITE_ZEROES data other than one 16-byte segment
  unsupported_flags,  // a segment flag we can't honour (UNSUPP)
  bad_sector_count,   // a segment of 0 or more than max_discard_sectors sectors
  too_many_pieces,    // more data pieces than the caller's array holds
};
const char* to_string(BlkRefusalReason r) noexcept;

// A request answered without being carried out.
struct BlkRefusal {
  BlkRefusalReason reason = BlkRefusalReason::no_status_byte;
  // The status to answer: VIRTIO_BLK_S_IOERR, or VIRTIO_BLK_S_UNSUPP (unknown type, a feature
  // not negotiated, an unsupported flag). Meaningless for no_status_byte.
  std::uint8_t answer = 0;
  std::uint8_t* status = nullptr;  // where to write it; nullptr for no_status_byte
};

// Parses `chain` against `limits`. The data pieces of a read, write or get_id are written to
// `data_out` (a bigger request is refused, too_many_pieces); nothing else is written. Reads of
// guest memory: the header and a discard segment, each once.
std::expected<BlkRequest, BlkRefusal> parse_blk_request(const BlkChain& chain,
                                                        const BlkLimits& limits,
                                                        std::span<iovec> data_out) noexcept;

}  // namespace vhostkit::blk
