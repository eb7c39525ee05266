package sdkhelper

// sdk-go v1.0.2's cgo flags link libbitwarden_c.a without -lm, so the link fails with
// "undefined reference to pow/ceil" (bitwarden/sdk-sm#1199, #1310). CGO_LDFLAGS=-lm does not
// help: it lands before the archive and gcc links --as-needed. Naming libm here, outside
// --as-needed, keeps "go build" working with no extra flags.

// #cgo linux LDFLAGS: -Wl,--no-as-needed -lm -Wl,--as-needed
import "C"
