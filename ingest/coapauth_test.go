package ingest

import (
	"sync"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestAuthenticatorCheck(t *testing.T) {
	a, err := newAuthenticator(testRegistry(t))
	require.NoError(t, err)
	tests := []struct {
		name, id, key string
		known, ok     bool
	}{
		{"the device's own key", "pipe-0001", "secret-pipe-0001", true, true},
		{"another device's key", "pipe-0001", "secret-pipe-0002", true, false},
		{"a key one byte short", "pipe-0001", "secret-pipe-000", true, false},
		{"no key", "pipe-0001", "", true, false},
		{"an unknown device", "pipe-9999", "secret-pipe-0001", false, false},
		{"an unknown device given its stand-in key", "pipe-9999", string(a.dummyKey(nil, []byte("pipe-9999"))), false, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d, known, ok := a.check(tc.id, tc.key)
			require.Equal(t, tc.known, known)
			require.Equal(t, tc.ok, ok)
			if known {
				require.Equal(t, tc.id, d.ID)
			}
		})
	}
}

// The pooled HMAC states give every caller, concurrently, the same answers
// and the same stand-in keys as a fresh state would.
func TestAuthenticatorIsSafeConcurrently(t *testing.T) {
	a, err := newAuthenticator(testRegistry(t))
	require.NoError(t, err)
	want := a.dummyKey(nil, []byte("tl-9999"))
	require.Len(t, want, 32)
	require.NotEqual(t, want, a.dummyKey(nil, []byte("tl-9998")), "a stand-in key differs per id")
	var wg sync.WaitGroup
	bad := make(chan string, 8)
	for range 8 {
		wg.Go(func() {
			for range 500 {
				if _, _, ok := a.check("pipe-0001", "secret-pipe-0001"); !ok {
					bad <- "the right key was refused"
					return
				}
				if _, _, ok := a.check("pipe-0001", "secret-pipe-0002"); ok {
					bad <- "a wrong key was taken"
					return
				}
				if string(a.dummyKey(nil, []byte("tl-9999"))) != string(want) {
					bad <- "the stand-in key changed"
					return
				}
			}
		})
	}
	wg.Wait()
	close(bad)
	for msg := range bad {
		t.Fatal(msg)
	}
}

// BenchmarkAuthenticatorCheck is one plain-UDP request's key check.
func BenchmarkAuthenticatorCheck(b *testing.B) {
	a, err := newAuthenticator(testRegistry(b))
	require.NoError(b, err)
	b.ReportAllocs()
	for b.Loop() {
		if _, _, ok := a.check("pipe-0001", "secret-pipe-0001"); !ok {
			b.Fatal("refused")
		}
	}
	b.ReportMetric(1, "checks/op")
}
