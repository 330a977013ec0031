package cluster

import (
	"os"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	if os.Getenv(ownerProcessEnv) != "" {
		os.Exit(runOwnerProcess())
	}
	goleak.VerifyTestMain(m)
}
