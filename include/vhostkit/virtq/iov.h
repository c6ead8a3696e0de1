// Byte copies over iovec lists: the pieces a chain's buffers translate to (Chain::readable,
// Chain::writable), a port's staging buffer, anything the data path reads or fills. One home
// for the walk over pieces, so a header split across descriptors or a frame spread over several
// chains is handled once (Firecracker keeps the same idea in one iovec module shared by its
// devices).
//
// Everything here is noexcept and allocates nothing. The pieces point into memory the guest may
// rewrite at any moment: the bytes copied may change under us, but the walk only trusts the
// iovec array itself, which the caller owns (the chain walker filled it from validated
// descriptors).
#pragma once

#include <sys/uio.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>

namespace vhostkit::virtq {

namespace detail {

// A byte position inside an iovec list: piece i, offset off inside it (off < its length, or
// i == the list's size at the end; a zero-length piece may also hold off == 0).
struct IovPos {
  std::size_t i = 0;
  std::size_t off = 0;
};

// Moves pos past up to n bytes of v; returns the bytes moved over (less than n only at the end).
// The loops keep the position in locals and store it once: a reference written per step would
// be reloaded after every memcpy, which may write anywhere as far as the compiler knows.
inline std::size_t iov_advance(std::span<const iovec> v, IovPos& pos, std::size_t n) noexcept {
  std::size_t i = pos.i, off = pos.off, done = 0;
  while (done < n && i < v.size()) {
    const std::size_t left = v[i].iov_len - off;
    const std::size_t k = std::min(left, n - done);
    done += k;
    if (k == left) {
      ++i;
      off = 0;
    } else {
      off += k;
    }
  }
  pos = IovPos{i, off};
  return done;
}

// Copies up to n bytes from src at spos into dst at dpos, moving both positions; returns the
// bytes copied (less than n when either side ends first). Zero-length pieces are stepped over.
inline std::size_t iov_copy(std::span<const iovec> dst, IovPos& dpos, std::span<const iovec> src,
                            IovPos& spos, std::size_t n) noexcept {
  std::size_t di = dpos.i, doff = dpos.off, si = spos.i, soff = spos.off, done = 0;
  while (done < n && di < dst.size() && si < src.size()) {
    const std::size_t sleft = src[si].iov_len - soff;
    const std::size_t dleft = dst[di].iov_len - doff;
    const std::size_t k = std::min(std::min(sleft, dleft), n - done);
    if (k != 0) {
      std::memcpy(static_cast<std::uint8_t*>(dst[di].iov_base) + doff,
                  static_cast<const std::uint8_t*>(src[si].iov_base) + soff, k);
    }
    done += k;
    if (k == sleft) {
      ++si;
      soff = 0;
    } else {
      soff += k;
    }
    if (k == dleft) {
      ++di;
      doff = 0;
    } else {
      doff += k;
    }
  }
  dpos = IovPos{di, doff};
  spos = IovPos{si, soff};
  return done;
}

}  // namespace detail

// The bytes v covers.
inline std::size_t iov_size(std::span<const iovec> v) noexcept {
  std::size_t n = 0;
  for (const iovec& p : v) n += p.iov_len;
  return n;
}

// Copies n bytes of src, starting `off` bytes in, to dst. Returns the bytes copied: less than n
// only when src holds fewer than off + n.
inline std::size_t iov_read(std::span<const iovec> src, std::size_t off, void* dst,
                            std::size_t n) noexcept {
  // Most reads (a header, an address) lie inside the first piece: one memcpy, no walk.
  if (!src.empty() && off <= src[0].iov_len && n <= src[0].iov_len - off) [[likely]] {
    if (n != 0) std::memcpy(dst, static_cast<const std::uint8_t*>(src[0].iov_base) + off, n);
    return n;
  }
  detail::IovPos sp;
  if (detail::iov_advance(src, sp, off) != off) return 0;
  detail::IovPos dp;
  const iovec out{dst, n};
  return detail::iov_copy(std::span<const iovec>(&out, 1), dp, src, sp, n);
}

// Copies n bytes from src into dst, starting `off` bytes in (a header split across pieces lands
// piecewise). Returns the bytes copied: less than n only when dst holds fewer than off + n.
inline std::size_t iov_write(std::span<const iovec> dst, std::size_t off, const void* src,
                             std::size_t n) noexcept {
  if (!dst.empty() && off <= dst[0].iov_len && n <= dst[0].iov_len - off) [[likely]] {
    if (n != 0) std::memcpy(static_cast<std::uint8_t*>(dst[0].iov_base) + off, src, n);
    return n;
  }
  detail::IovPos dp;
  if (detail::iov_advance(dst, dp, off) != off) return 0;
  detail::IovPos sp;
  const iovec in{const_cast<void*>(src), n};  // only ever read through
  return detail::iov_copy(dst, dp, std::span<const iovec>(&in, 1), sp, n);
}

// Copies up to n bytes from src (from src_off on) into dst (from dst_off on). Returns the bytes
// copied: the least of n and what each side holds past its offset.
inline std::size_t iov_copy(std::span<const iovec> dst, std::size_t dst_off,
                            std::span<const iovec> src, std::size_t src_off,
                            std::size_t n) noexcept {
  detail::IovPos dp, sp;
  if (detail::iov_advance(dst, dp, dst_off) != dst_off) return 0;
  if (detail::iov_advance(src, sp, src_off) != src_off) return 0;
  return detail::iov_copy(dst, dp, src, sp, n);
}

// The pieces of src after its first `off` bytes, written to out without copying any data (the
// first one shortened). Returns how many were written; stops early when out is full, so out
// should hold src.size() pieces.
inline std::size_t iov_tail(std::span<const iovec> src, std::size_t off,
                            std::span<iovec> out) noexcept {
  std::size_t n = 0;
  for (const iovec& v : src) {
    if (off >= v.iov_len) {
      off -= v.iov_len;
      continue;
    }
    if (n == out.size()) break;
    out[n++] = iovec{static_cast<std::uint8_t*>(v.iov_base) + off, v.iov_len - off};
    off = 0;
  }
  return n;
}

// A read/write position over an iovec list that keeps its place between calls: the source of a
// frame copied into several rx chains, or a chain filled in steps. The list itself is borrowed
// and must outlive the cursor.
class IovCursor {
 public:
  IovCursor() noexcept = default;
  explicit IovCursor(std::span<const iovec> v) noexcept : v_(v) {}

  // Bytes between the position and the end (a walk over the pieces left: the copies never need
  // it, so the cursor does not keep a count up to date).
  std::size_t remaining() const noexcept {
    if (pos_.i >= v_.size()) return 0;
    return iov_size(v_.subspan(pos_.i)) - pos_.off;
  }
  bool at_end() const noexcept { return remaining() == 0; }

  // Moves past n bytes (fewer at the end); returns how many.
  std::size_t advance(std::size_t n) noexcept { return detail::iov_advance(v_, pos_, n); }

  // Copies up to n bytes from the position to dst and moves past them; returns how many.
  std::size_t read(void* dst, std::size_t n) noexcept {
    detail::IovPos dp;
    const iovec out{dst, n};
    return detail::iov_copy(std::span<const iovec>(&out, 1), dp, v_, pos_, n);
  }

  // Copies up to n bytes from src into the pieces at the position and moves past them; returns
  // how many.
  std::size_t write(const void* src, std::size_t n) noexcept {
    detail::IovPos sp;
    const iovec in{const_cast<void*>(src), n};  // only ever read through
    return detail::iov_copy(v_, pos_, std::span<const iovec>(&in, 1), sp, n);
  }

  // Copies up to n bytes from the position into dst, starting dst_off bytes into dst, and moves
  // past them; returns how many (limited by n, by what is left here and by dst's room).
  std::size_t copy_to(std::span<const iovec> dst, std::size_t dst_off, std::size_t n) noexcept {
    detail::IovPos dp;
    if (detail::iov_advance(dst, dp, dst_off) != dst_off) return 0;
    return detail::iov_copy(dst, dp, v_, pos_, n);
  }

  // Copies up to n bytes from this cursor's position to dst's, moving both; returns how many.
  std::size_t copy_to(IovCursor& dst, std::size_t n) noexcept {
    return detail::iov_copy(dst.v_, dst.pos_, v_, pos_, n);
  }

  // The pieces from the position on, written to out without copying data (as iov_tail).
  std::size_t rest(std::span<iovec> out) const noexcept {
    return iov_tail(v_.subspan(std::min(pos_.i, v_.size())), pos_.off, out);
  }

 private:
  std::span<const iovec> v_{};
  detail::IovPos pos_{};
};

}  // namespace vhostkit::virtq
