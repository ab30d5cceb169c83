output "vpc_id" {
  description = "ID of the VPC."
  value       = aws_vpc.this.id
}

output "azs" {
  description = "Availability zones the subnets are in."
  value       = local.azs
}

output "private_subnet_ids" {
  description = "Private subnets (nodes, pods, internal load balancers), one per zone."
  value       = aws_subnet.private[*].id
}

output "public_subnet_ids" {
  description = "Public subnets (internet-facing load balancers, NAT gateways), one per zone."
  value       = aws_subnet.public[*].id
}

output "nat_public_ips" {
  description = "Public addresses the cluster's outbound traffic comes from (for allow-lists elsewhere)."
  value       = aws_eip.nat[*].public_ip
}
