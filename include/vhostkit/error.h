// Errors as values: every fallible call returns std::expected<T, Error>.
#pragma once

#include <cerrno>
#include <cstdint>
#include <expected>
#include <string>
#include <string_view>
#include <utility>

namespace vhostkit {

enum class Errc : std::uint8_t {
  invalid_argument,  // a value a peer sent (or a caller passed) breaks a rule
  out_of_range,      // an index, address or length outside what is allowed
  not_mapped,        // a guest or frontend address no memory region covers
  overlap,           // a memory region collides with another
  too_many,          // a count over its bound (regions, fds, descriptors)
  bad_state,         // the request is not valid in the current state
  broken,            // the peer broke the protocol; the device is stopped
  unsupported,       // a feature or request we do not implement
  system,            // a system call failed; sys_errno says why
  disconnected,      // the peer went away
  would_block,       // nothing to do now; try again later
};

std::string_view to_string(Errc code) noexcept;

// Control-path error: a code plus a sentence for the log. The data path never builds these;
// it counts enum codes instead (see virtq::ChainError).
struct Error {
  Errc code = Errc::invalid_argument;
  int sys_errno = 0;
  std::string detail;

  std::string message() const;
};

inline std::unexpected<Error> fail(Errc code, std::string detail, int sys_errno = 0) {
  return std::unexpected<Error>(Error{code, sys_errno, std::move(detail)});
}

// For a failed system call: captures errno now.
inline std::unexpected<Error> fail_errno(std::string detail) {
  return fail(Errc::system, std::move(detail), errno);
}

template <typename T = void>
using Result = std::expected<T, Error>;

}  // namespace vhostkit
