package redirect

import "testing"

// TestNewRejectsZeroPort needs no privileges: the port is validated before
// any netlink socket is opened.
func TestNewRejectsZeroPort(t *testing.T) {
	fw, err := New(0)
	if err == nil {
		fw.Close()
		t.Fatal("New(0) succeeded, want an error")
	}
}
