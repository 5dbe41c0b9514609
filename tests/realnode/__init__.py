"""A real Kubernetes node (containerd, runc, CNI, kubelet, kube-proxy, CoreDNS) for the tests."""
