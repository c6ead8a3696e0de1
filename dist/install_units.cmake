# Run by `cmake --install` (and by cpack): writes the systemd units with the programs' absolute
# path under the prefix being installed to. Variables come from dist/CMakeLists.txt's
# install(CODE) just before this script.
set(VHOSTKIT_BINDIR "${CMAKE_INSTALL_PREFIX}/${VHOSTKIT_REL_BINDIR}")
set(VHOSTKIT_DOCDIR "${CMAKE_INSTALL_PREFIX}/${VHOSTKIT_REL_DOCDIR}")
set(unit_dir "$ENV{DESTDIR}${CMAKE_INSTALL_PREFIX}/lib/systemd/system")
foreach(unit IN LISTS VHOSTKIT_UNITS)
  message(STATUS "Installing: ${unit_dir}/${unit}")
  configure_file("${VHOSTKIT_UNIT_SOURCE_DIR}/${unit}" "${unit_dir}/${unit}" @ONLY)
endforeach()
