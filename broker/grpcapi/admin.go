package grpcapi

import (
	"context"
	"fmt"

	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tokenbroker/tokenbroker/broker"
	"github.com/tokenbroker/tokenbroker/broker/policy"
	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
)

// Admin serves the tokenbroker.v1.Admin service: the operators' inventory,
// to the identities the current configuration's admin.callers admits.
type Admin struct {
	pb.UnimplementedAdminServer
	// Callers returns the matcher of admin.callers in force (it follows
	// configuration reloads); nil admits nobody.
	Callers func() *policy.Matcher
	// Describe describes the credential named, or all when name is "";
	// ok is false when no credential has that name.
	Describe func(name string) (creds []*pb.CredentialDescription, ok bool)
	// Log receives one line per call; nil means none.
	Log *zap.Logger
}

var _ pb.AdminServer = (*Admin)(nil)

// DescribeCredentials describes the configured credentials to an admin caller.
func (a *Admin) DescribeCredentials(ctx context.Context, req *pb.DescribeCredentialsRequest) (*pb.DescribeCredentialsResponse, error) {
	caller, err := callerFrom(ctx)
	if err != nil {
		return nil, toStatus(err)
	}
	if m := a.Callers(); m == nil || !m.Allows(caller) {
		a.log().Info("admin call refused", zap.String("caller", string(caller)), zap.String("method", "DescribeCredentials"))
		return nil, toStatus(fmt.Errorf("%w: caller %s is not in admin.callers", broker.ErrPermissionDenied, caller))
	}
	creds, ok := a.Describe(req.GetName())
	if !ok {
		return nil, status.Errorf(codes.NotFound, "no credential named %q", req.GetName())
	}
	a.log().Info("admin call", zap.String("caller", string(caller)), zap.String("method", "DescribeCredentials"),
		zap.String("credential", req.GetName()))
	return &pb.DescribeCredentialsResponse{Credentials: creds}, nil
}

func (a *Admin) log() *zap.Logger {
	if a.Log == nil {
		return zap.NewNop()
	}
	return a.Log
}
